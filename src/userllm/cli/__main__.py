"""``python -m userllm.cli``: the ``userllm`` command (e.g. under torchrun)."""

from userllm.cli import main

main()
