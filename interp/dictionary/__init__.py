"""Dictionaries: SAEs and transcoders, their training, metrics and file formats."""

from interp.dictionary.io import export_saelens, import_saelens, load_dictionary, save_dictionary
from interp.dictionary.metrics import reconstruction_metrics, splice_metrics
from interp.dictionary.sae import ARCHITECTURES, Code, DictionaryConfig, SparseDictionary
from interp.dictionary.train import TrainConfig, Trainer, train

__all__ = [
    "ARCHITECTURES", "Code", "DictionaryConfig", "SparseDictionary", "TrainConfig", "Trainer", "export_saelens",
    "import_saelens", "load_dictionary", "reconstruction_metrics", "save_dictionary", "splice_metrics", "train",
]
