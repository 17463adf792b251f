"""The shared on-disk activation store: harvest once, read fast, never lose rows."""

from interp.store.write import HarvestConfig, harvest, write_arrays
from interp.store.read import ActivationStore, Batches

__all__ = ["ActivationStore", "Batches", "HarvestConfig", "harvest", "write_arrays"]
