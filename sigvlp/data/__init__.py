"""CT data pipeline: NIfTI reading (HU, canonical orientation), preprocessing and its cache,
the CT-RATE reader, variable-depth chunks with organ-wise text, packed varlen batches and a
seeded DataLoader. (Synthetic phantoms in the CT-RATE layout are the demo's: sigvlp.demo.synth.)

Names are imported on first use, so importing one submodule stays cheap.
Nothing in sigvlp.ops or sigvlp.kernels imports this package.
"""

from importlib import import_module as _import_module

_EXPORTS = {
    "sigvlp.data.volume": ["RescaleDecision", "Volume", "load_volume", "load_mask"],
    "sigvlp.data.organs": ["ORGANS", "ORGAN_GROUPS", "TS_IDS", "organ_z_profile"],
    "sigvlp.data.masks": ["TOTAL_CLASSES", "load_total_labels"],
    "sigvlp.data.preprocess": ["PRESETS", "CachedVolume", "PreprocessCache", "PreprocessConfig", "default_cache_root",
                               "file_fingerprint", "preprocess_array", "preset"],
    "sigvlp.data.ctrate": ["CTRATE_LABELS", "CTRateDataset", "CTRateRecord", "ScanReport", "build_cache",
                           "split_folders"],
    "sigvlp.data.chunks": ["CHUNK_PRESETS", "ChunkConfig", "ChunkSampler", "chunk_preset", "chunk_text",
                           "load_findings_bank", "organs_in_chunk"],
    "sigvlp.data.tokenizers": ["ByteTokenizer", "HFTokenizer", "WordTokenizer", "load_tokenizer"],
    "sigvlp.data.collate": ["collate_chunks", "pair_ids", "patchify", "validate_batch"],
    "sigvlp.data.loader": ["ChunkSource", "ChunkStream", "LoaderConfig", "make_loader"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(_import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sigvlp.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
