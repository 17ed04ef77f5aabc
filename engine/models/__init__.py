"""Models: towers, projection heads, the joint model, tokenizers and every checkpoint format.

=========================  ===================================================================
module                     what it holds
=========================  ===================================================================
:mod:`.model`              ``TranscriptomeTextModel`` (CLIP: ``transcriptome_embeds``, ``text_embeds``, ``logit_scale``)
:mod:`.towers`             transcriptome towers (sparse rank tower) and the text tower
:mod:`.heads`              projection heads
:mod:`.tokenizer`          ``RankTokenizer`` and ``RankEncoding`` (rank/bin encodings, scEMB / Geneformer)
:mod:`.checkpoint`         the native format: ``load_model``, ``save_model``
:mod:`.geneformer`         Geneformer's tokenizer and BERT tower, from its published files
:mod:`.cellwhisperer`      CellWhisperer's Lightning checkpoint, read without executing pickles
:mod:`.safe_pickle`        the restricted unpickler behind both
:mod:`.convert`            ``python -m engine.convert``
=========================  ===================================================================

May import: :mod:`engine.errors`, :mod:`engine.paths`, :mod:`engine.io` (inside functions).
"""
from .._lazy import lazy_exports

_EXPORTS = {
    "TranscriptomeTextModel": "model",
    "RankTokenizer": "tokenizer",
    "RankEncoding": "tokenizer",
    "SparseRankTower": "towers",
    "TextTower": "towers",
    "load_model": "checkpoint",
    "save_model": "checkpoint",
    "load_cellwhisperer": "cellwhisperer",
    "load_geneformer": "geneformer",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
