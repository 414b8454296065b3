"""Applications built on the model: the ``ernie-vl`` CLI (``cli/``), the demo (``demo/``) and the HTTP server (``serve/``).

``hub.load_model`` turns a model spec (a checkpoint folder or ``open_clip:ARCH[:WEIGHTS]``) into a model, its
transform and tokenizer for these applications. Nothing outside ``ernie_vl.app`` imports this package.
"""
