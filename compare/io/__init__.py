"""Files, every one untrusted when read (docs/files.md): weights (``checkpoint``), conversion
between the frameworks' files (``convert``; the command line is ``python -m compare.convert``),
full training state for exact resume (``train_state``), datasets (``datasets``) and
``results.json`` (``results_file``); under them atomic writes and the safetensors and zip
containers (``files``), the bounded unpickler (``pickles``) and the budgets (``limits``)."""

__all__ = ["checkpoint", "convert", "datasets", "files", "limits", "pickles", "results_file", "train_state"]
