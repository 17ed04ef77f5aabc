"""The per-session state class: parameters, dataset, layouts and model (methods come from the mixins)."""
from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import param

import engine
from engine.errors import MissingEmbeddingError
from engine.tools.layout import LARGE_LAYOUT_FROM

from .. import cache
from .analyses import AnalysisMixin
from .colouring import ColouringMixin
from .common import DENSITY, QueryRecord
from .export import ExportMixin
from .queries import QueryMixin

__all__ = ["AppState"]

log = logging.getLogger("app.state")


class AppState(ColouringMixin, QueryMixin, AnalysisMixin, ExportMixin, param.Parameterized):
    """State of one dashboard session.

    Parameters
    ----------
    adata
        This session's AnnData (see :func:`app.cache.session_adata`): ``obs`` is private, matrices shared.
    model
        The transcriptome-text model (shared, read-only).
    """

    adata = param.ClassSelector(class_=ad.AnnData, doc="This session's dataset (obs private, matrices shared).")
    model = param.Parameter(doc="engine.TranscriptomeTextModel, shared read-only.")
    dataset_name = param.String(default="dataset")
    input_path = param.String(default=None, allow_None=True, doc="File the dataset was read from (never overwritten).")
    save_dir = param.String(default=None, allow_None=True,
                            doc="Served mode: the only folder this session writes to (names only); None: Jupyter.")
    max_download_bytes = param.Integer(default=200 * 2**20, bounds=(0, None),
                                       doc="Largest .h5ad sent through the page; larger ones are kept on the server.")

    embeds_ready = param.Boolean(default=False, doc="obsm['transcriptome_embeds'] of this model is present.")
    layout_key = param.Selector(default=None, objects=[], allow_None=True, doc="obsm key of the 2-D layout.")
    color_by = param.String(default=DENSITY, doc="obs column, or one of the special colourings.")
    gene = param.String(default="")

    query = param.String(default="", doc="Text of the current query.")
    scores = param.Array(default=None, allow_None=True, doc="(n_cells,) float32 logits of the current query.")
    history = param.List(default=[], item_type=QueryRecord)

    selection = param.Array(default=None, allow_None=True, doc="Integer positions of selected cells; None = none.")
    selection_geometry = param.Parameter(default=None, doc="('box', (x0, y0, x1, y1)) or ('lasso', (n, 2) array).")

    zs_probs = param.DataFrame(default=None, allow_None=True, doc="(n_cells, n_labels) zero-shot probabilities.")
    zs_template = param.String(default="cellwhisperer")
    zs_smooth = param.Boolean(default=True, doc="Zero-shot on neighbour-smoothed embeddings (engine.smooth_embeds).")
    evaluation = param.Dict(default=None, allow_None=True, doc="engine.training.evaluate.evaluate result.")

    description = param.DataFrame(default=None, allow_None=True)
    de_table = param.DataFrame(default=None, allow_None=True)
    enrich_table = param.DataFrame(default=None, allow_None=True)
    perturb_table = param.DataFrame(default=None, allow_None=True)
    perturb_values = param.Array(default=None, allow_None=True, doc="(n_cells,) per-cell perturbation effect, NaN elsewhere.")
    perturb_metric = param.String(default="")
    scan_table = param.DataFrame(default=None, allow_None=True)

    message = param.String(default="")
    message_kind = param.Selector(default="info", objects=["info", "success", "warning", "danger"])
    map_version = param.Integer(default=0, doc="Bumped whenever the map must be redrawn.")

    def __init__(self, adata: ad.AnnData, model=None, **params):
        super().__init__(adata=adata, model=model, **params)
        self._base: ad.AnnData | None = None  # the shared dataset, once attach_embeddings has seen it
        self._download_dir = None  # Jupyter downloads: a temporary folder of this session
        self._gene_cache: tuple[str, np.ndarray] | None = None  # the last gene's values (streamed when backed)
        self._refresh_layouts()
        self.color_by = self.default_color()
        self.embeds_ready = cache.has_embeddings(adata, model)
        if self.backed and adata.n_obs >= LARGE_LAYOUT_FROM and "zs_smooth" not in params:
            # the neighbour graph of an atlas takes minutes: smoothing is the user's choice there
            self.zs_smooth = False

    @property
    def backed(self) -> bool:
        """Whether the expression matrix stays on disk (``run_app.py --backed``); then nothing loads it whole."""
        return engine.is_backed(self.adata) if self.adata is not None else False

    def set_model(self, model) -> None:
        """Attach the model once it is loaded (the map works without it)."""
        self.model = model
        self.embeds_ready = cache.has_embeddings(self.adata, model)

    def default_color(self) -> str:
        """A metadata column to colour by at first: a cell-type-like categorical column, else density."""
        preferred = ("cell_type", "celltype", "cell_ontology_class", "bulk_labels", "leiden", "louvain", "cluster")
        cols = list(self.adata.obs.columns)
        for p in preferred:
            for c in cols:
                if c.lower() == p and 2 <= self.adata.obs[c].nunique() <= 60:
                    return c
        for c in cols:
            s = self.adata.obs[c]
            if isinstance(s.dtype, pd.CategoricalDtype) and 2 <= s.nunique() <= 60:
                return c
        return DENSITY

    # ------------------------------------------------------------------ dataset, layouts
    def layouts(self) -> list[str]:
        """obsm keys of the available 2-D layouts."""
        return [k for k in self.param.layout_key.objects if k]

    def _refresh_layouts(self) -> None:
        keys = cache.layout_keys(self.adata)
        self.param.layout_key.objects = keys
        if self.layout_key not in keys:
            self.layout_key = keys[0] if keys else None

    def attach_embeddings(self, base: ad.AnnData | None = None) -> None:
        """Take over embeddings (and new layouts) computed on the shared ``base`` dataset."""
        if base is not None and base is not self.adata:
            self._base = base
            cache.sync_from_base(self.adata, base)
        self._refresh_layouts()
        self.embeds_ready = cache.has_embeddings(self.adata, self.model)
        self.map_version += 1

    def coords(self) -> np.ndarray | None:
        """``(n_cells, 2)`` float32 coordinates of the current layout, or None without any layout."""
        if self.layout_key is None:
            return None
        return np.asarray(self.adata.obsm[self.layout_key])[:, :2].astype(np.float32, copy=False)

    @property
    def n_cells(self) -> int:
        return int(self.adata.n_obs)

    def notify(self, text: str, kind: str = "info") -> None:
        """Show a message in the page (views watch ``message``)."""
        self.param.update(message=text, message_kind=kind)

    def _require_embeddings(self) -> None:
        if not self.embeds_ready:
            log.debug("no embeddings: state %x model %s obsm %s", id(self), self.model is not None,
                      list(self.adata.obsm.keys()))
            raise MissingEmbeddingError(
                "The cells are still being embedded", found="no transcriptome embeddings yet",
                expected="obsm['transcriptome_embeds']", fix="wait until the progress bar at the top has finished")


    # ------------------------------------------------------------------ model
    def model_info(self) -> dict:
        """What the About pane shows about the loaded model."""
        m = self.model
        cfg = m.config_dict()
        return {
            "name": m.name,
            "projection_dim": int(m.projection_dim),
            "logit_scale": float(m.logit_scale.detach().exp().cpu()),
            "fingerprint": m.fingerprint(),
            "source": getattr(m, "_source", None),
            "transcriptome_tower": cfg.get("transcriptome_tower"),
            "text_tower": cfg.get("text_tower"),
            "heads": {"transcriptome": cfg.get("transcriptome_projection"), "text": cfg.get("text_projection")},
            "metadata": dict(getattr(m, "metadata", {}) or {}),
            "config": cfg,
        }
