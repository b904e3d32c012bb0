"""``python -m onnxlrp ...``: the same as the ``onnxlrp`` command."""
from .cli import main

if __name__ == "__main__":
    main()
