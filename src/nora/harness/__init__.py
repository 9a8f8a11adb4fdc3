"""Training / evaluation harness behind the `nora` CLI: model loading, data, Trainer-based training, evaluation and
the end-to-end demo. Everything here is optional tooling around the core `nora` package (which never imports it).

    from nora.harness.models import load_model
    model, tokenizer = load_model("smollm2-135m")
"""

from __future__ import annotations


class HarnessError(Exception):
    """A user-facing error (bad model name, missing data, unknown method...): the CLI prints it without a traceback."""


__all__ = ["HarnessError"]
