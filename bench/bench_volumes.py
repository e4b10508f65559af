"""Volumes as k slices: what a record's volume costs to read, for a NIfTI file and for a DICOM series folder.

Generated data (a smooth CT-like NIfTI volume, gzipped; a series of single-frame DICOM files made from
pydicom's CT test slice), one process, the best of `--repeats` runs of each figure:

- `volume_slices(path, k)`: the whole volume read once, k slices rendered;
- the k slice references of a record loaded one by one through `load_image` (what the DataLoader and
  the preflight do): the first decodes the volume and renders all k, the others are served from the
  rendered slices (cold = the first load after the file changed, warm = every later one);
- the same k slices loaded without that reuse, `load_image(path, frame=i)` k times: each call
  decompresses and decodes the volume again (the baseline the reuse saves).

    OMP_NUM_THREADS=1 python bench/bench_volumes.py [--size 256 --depth 160 --files 128 --k 8 --repeats 3]
"""
import argparse, copy, os, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_nifti(path: Path, size: int, depth: int):
    "An int16 CT-like volume (an ellipsoid of soft tissue with a brighter core, 20 HU noise), gzipped."
    import nibabel as nib, numpy as np
    z, y, x = np.ogrid[:depth, :size, :size]
    r = (((x - size / 2) / (0.4 * size)) ** 2 + ((y - size / 2) / (0.3 * size)) ** 2
         + ((z - depth / 2) / (0.45 * depth)) ** 2)
    vol = np.where(r < 1, 40, -1000) + np.where(r < 0.2, 300, 0)  # HU-like: air, soft tissue, bone-like core
    vol = vol + np.random.default_rng(0).normal(0, 20, vol.shape)  # scanner noise: gzip cannot fold it away
    nib.save(nib.Nifti1Image(vol.astype(np.int16).transpose(2, 1, 0).copy(), np.eye(4)), path)


def make_series(folder: Path, n: int):
    "`n` single-frame CT slices (pydicom's 128 x 128 CT_small) at 1.25 mm steps, file names out of order."
    import pydicom
    from pydicom.data import get_testdata_file
    folder.mkdir()
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    stored = template.pixel_array
    for j in range(n):
        ds = copy.deepcopy(template); ds.ImagePositionPatient = [0, 0, 1.25 * j]; ds.InstanceNumber = j + 1
        ds.save_as(folder / f"IM{(7919 * j) % 10007:05d}.dcm")


def best(fn, repeats: int) -> float:
    "The shortest wall time of `repeats` calls of `fn`, in seconds."
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="NIfTI slice side in voxels")
    ap.add_argument("--depth", type=int, default=160, help="NIfTI slices")
    ap.add_argument("--files", type=int, default=128, help="DICOM files in the series")
    ap.add_argument("--k", type=int, default=8, help="slices per volume")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from llavamed.images import _SLICES, load_image, slice_ref, volume_slices
    k = args.k
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_nifti(root / "ct.nii.gz", args.size, args.depth)
        make_series(root / "series", args.files)
        volumes = {f"NIfTI {args.size}x{args.size}x{args.depth} int16 .nii.gz "
                   f"({(root / 'ct.nii.gz').stat().st_size / 2**20:.1f} MB)": (root / "ct.nii.gz", "ct.nii.gz"),
                   f"DICOM series, {args.files} files of 128x128": (root / "series", "series/")}
        print(f"k = {k}; best of {args.repeats}; {os.cpu_count()} CPUs, OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
        for label, (path, name) in volumes.items():
            refs = [str(root / slice_ref(name, i, k)) for i in range(1, k + 1)]
            n = args.depth if name.endswith(".nii.gz") else args.files
            frames = [(2 * i + 1) * n // (2 * k) for i in range(k)]
            whole = best(lambda: volume_slices(path, k), args.repeats)

            def cold():
                _SLICES.clear()
                for ref in refs: load_image(ref)
            cold_s = best(cold, args.repeats)
            warm_s = best(lambda: [load_image(ref) for ref in refs], args.repeats)
            frames_s = best(lambda: [load_image(path, frame=f) for f in frames], args.repeats)
            print(f"\n{label}")
            print(f"  volume_slices(path, {k}):                 {whole * 1000:8.1f} ms")
            print(f"  {k} slice references, cold (one decode):   {cold_s * 1000:8.1f} ms")
            print(f"  {k} slice references, warm (rendered):     {warm_s * 1000:8.1f} ms "
                  f"({warm_s / k * 1000:.2f} ms per slice)")
            print(f"  {k} x load_image(path, frame=i), no reuse: {frames_s * 1000:8.1f} ms "
                  f"({frames_s / cold_s:.1f}x the cold references)")


if __name__ == "__main__":
    main()
