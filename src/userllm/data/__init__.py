"""Timelines: raw interaction logs -> normalized events/items tables -> prepared per-user sequences.

- :mod:`~userllm.data.schema`: the two normalized tables every reader produces.
- :mod:`~userllm.data.readers`: one reader per ``--source``.
- :mod:`~userllm.data.prepare`: dedup, filters, vocabularies, leave-last-out split, labels, manifest.
- :mod:`~userllm.data.dataset`: loading a prepared dataset directory.
"""

from userllm.data.dataset import PreparedDataset
from userllm.data.prepare import prepare_dataset

__all__ = ["PreparedDataset", "prepare_dataset"]
