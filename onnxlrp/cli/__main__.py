"""``python -m onnxlrp.cli ...``: the same as the ``onnxlrp`` command."""
from . import main

if __name__ == "__main__":
    main()
