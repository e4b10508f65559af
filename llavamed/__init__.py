"""Build, train and evaluate LLaVA-Med style biomedical vision-language assistants: data, self-instruct, curriculum training, evaluation.

Modules:

- `llavamed.synth`: The synthetic biomedical figure corpus: rendered figures in the five LLaVA-Med domains, their ground-truth findings, captions, VQA questions, a conversation benchmark and tower labels."""

__version__ = "0.1.0"
