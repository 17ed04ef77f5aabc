"""Save and export: the annotated dataset (.h5ad), the map (PNG) and every table (CSV); the About pane."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import panel as pn

from ..state import AppState
from .common import Job, StateView, csv_download, plain
from . import panes

__all__ = ["ExportView", "AboutView"]


def _stem(state: AppState) -> str:
    """A file-name-safe stem for exports, from the input file or the dataset name."""
    name = Path(state.input_path).stem if state.input_path else state.dataset_name
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_.") or "dataset"


def _default_save_path(state: AppState) -> str:
    if state.save_dir:  # served: the browser chooses a name, the operator's --save-dir the folder
        return f"{_stem(state)}_lexicell.h5ad"
    folder = Path(state.input_path).parent if state.input_path else Path.cwd()
    return str(folder / f"{_stem(state)}_lexicell.h5ad")


class ExportView(StateView):
    """Save the session's annotated dataset to a new file, download it, the map PNG and the tables.

    Served, the text box takes a file name only; the file goes to the server's export folder
    (``state.save_dir``). "Prepare .h5ad download" writes the file off the event loop (into the export folder
    when served) and then offers it through a download button, unless it is larger than
    ``state.max_download_bytes``: then the page says where the file is instead of sending it.
    """

    def __init__(self, state: AppState, **params):
        super().__init__(state, **params)
        self.job = Job()
        served = bool(state.save_dir)
        label = ("File name (saved in the server's export folder; an existing file is never replaced)" if served
                 else "Save annotated dataset on the server as (new .h5ad file)")
        self.path = pn.widgets.TextInput(label=label, value=_default_save_path(state), sizing_mode="stretch_width")
        self.save = pn.widgets.Button(label="Save .h5ad", color="primary", width=120, margin=(23, 5, 5, 5))
        self.saved = panes.Markdown("")
        self.prepare = pn.widgets.Button(label="Prepare .h5ad download", color="light", width=200)
        self.download_job = Job()
        self.h5ad_download = pn.widgets.FileDownload(filename=f"{_stem(state)}_lexicell.h5ad", label="Download .h5ad",
                                                     color="success", width=260, visible=False)
        self.png_download = pn.widgets.FileDownload(callback=self._png, filename=f"{_stem(state)}_map.png",
                                                    label="Map PNG", color="light", width=180)
        self.save.on_click(self._save)
        self.prepare.on_click(self._prepare_download)
        self.tables = [
            csv_download(self._obs, "obs.csv", "Cell table (obs) CSV"),
            csv_download(self._scores, "query_scores.csv", "Query scores CSV"),
            csv_download(lambda: self.state.zs_probs, "zero_shot_probabilities.csv", "Zero-shot probabilities CSV"),
            csv_download(self._metrics, "zero_shot_metrics.csv", "Zero-shot metrics CSV"),
            csv_download(lambda: self.state.description, "description.csv", "Description CSV"),
            csv_download(lambda: self.state.de_table, "de_top_vs_bottom.csv", "DE table CSV"),
            csv_download(lambda: self.state.enrich_table, "enrichment.csv", "Enrichment CSV"),
            csv_download(lambda: self.state.perturb_table, "perturbation_cells.csv", "Perturbation CSV"),
            csv_download(lambda: self.state.scan_table, "perturbation_scan.csv", "Perturbation scan CSV"),
        ]

    def __panel__(self):
        where = ("Files go to the server's export folder; you choose the name only."
                 if self.state.save_dir else "")
        if self.state.backed:
            where += (" This dataset is served backed (its expression stays on disk): the page does not write it "
                      "as .h5ad; use the tables below.")
        return pn.Column(
            panes.Markdown("The dataset is never overwritten: results are written to a **new** file. Kept query "
                             "scores, accepted labels and DE groups are obs columns of this session only. " + where),
            pn.Row(self.path, self.save, sizing_mode="stretch_width"), self.job, self.saved,
            pn.Row(self.prepare, self.h5ad_download, self.png_download), self.download_job,
            panes.Markdown("#### Tables"),
            pn.FlexBox(*self.tables),
            sizing_mode="stretch_width",
        )

    async def _save(self, event=None):
        path = self.path.value
        st = self.state

        def apply(p):
            renamed = ""
            typed = path.strip()
            if st.save_dir and p.name not in (typed, typed + ".h5ad"):
                renamed = (f" (from {plain(typed[:120])}: only letters, digits, '.', '_' and '-' are kept, "
                           "and a number is added when the name exists)")
            self.saved.object = f"Saved to {plain(p)}{renamed}."
            st.notify(f"Saved the annotated dataset to {p}.", "success")

        await self.job.run(lambda: st.save_h5ad(path), apply, label="Writing .h5ad", disable=[self.save])

    async def _prepare_download(self, event=None):
        """Write the .h5ad off the event loop, then offer it (or say where it is when it is too large)."""
        st = self.state
        self.h5ad_download.visible = False

        def apply(p):
            too_large = st.download_too_large(p)
            if too_large:
                self.download_job.show(too_large, "warning")
                return
            mb = p.stat().st_size / 2**20
            self.h5ad_download.param.update(file=str(p), filename=p.name, label=f"Download {p.name} ({mb:,.1f} MB)",
                                            visible=True)

        await self.download_job.run(st.download_file, apply, label="Writing .h5ad for download",
                                    disable=[self.prepare])

    def _png(self):
        return io.BytesIO(self.state.map_png())

    def _obs(self):
        return self.state.adata.obs

    def _scores(self):
        if not self.state.history:
            return None
        return pd.DataFrame({h.query: h.scores for h in self.state.history}, index=self.state.adata.obs_names)

    def _metrics(self):
        ev = self.state.evaluation
        if not ev:
            return None
        rows = []
        for level in ("per_cell", "per_class"):
            rows.append({"level": level, **{k: v for k, v in (ev.get(level) or {}).items() if not isinstance(v, list)}})
        return pd.DataFrame(rows)


class AboutView(StateView):
    """The loaded model (name, towers, projection, metadata, full config) and the dataset."""

    def __init__(self, state: AppState, **params):
        super().__init__(state, **params)
        self.summary = panes.Markdown("", sizing_mode="stretch_width")
        self.config = pn.pane.JSON({}, depth=2, name="config", sizing_mode="stretch_width", theme="light")
        self.metadata = pn.pane.JSON({}, depth=2, name="metadata", sizing_mode="stretch_width", theme="light")
        self.state.param.watch(self.refresh, ["embeds_ready"])
        self.refresh()

    def __panel__(self):
        return pn.Column(self.summary, panes.Markdown("#### Model metadata"), self.metadata,
                         panes.Markdown("#### Model configuration (config.json)"), self.config,
                         sizing_mode="stretch_width")

    def refresh(self, *_):
        st = self.state
        info = st.model_info()
        tt = info["transcriptome_tower"] or {}
        xt = info["text_tower"] or {}
        emb = st.adata.uns.get("transcriptome_embeds", {})
        params = emb.get("params", {}) if isinstance(emb, dict) else {}
        e = plain
        lines = [
            f"### Model: {e(info['name'])}",
            f"- shared space: **{info['projection_dim']}** dimensions; logit scale exp(logit_scale) = {info['logit_scale']:.2f}",
            f"- transcriptome tower: {e(tt.get('type', '?'))} (hidden size {e(tt.get('hidden_size', '?'))}, "
            f"{e(tt.get('n_layers', '?'))} layers); head {e((info['heads']['transcriptome'] or {}).get('type', '?'))}",
            f"- text tower: {e(xt.get('type', '?'))} from {e(xt.get('source', '?'))} (pooling {e(xt.get('pooling', '?'))}); "
            f"head {e((info['heads']['text'] or {}).get('type', '?'))}",
            f"- fingerprint {e(info['fingerprint'])}; loaded from {e(info['source'])}",
            f"### Dataset: {e(st.dataset_name)}",
            f"- {st.n_cells:,} cells × {st.adata.n_vars:,} genes; layouts: {e(', '.join(st.layouts()) or 'none yet')}",
            f"- embeddings: {'ready' if st.embeds_ready else 'being computed'}"
            + (f" ({e(params.get('n_genes_matched'))} of {e(params.get('n_genes'))} genes matched the model's "
               f"vocabulary, expression: {e(params.get('expression'))})" if params else ""),
        ]
        lines += [f"- note: {e(w)}" for w in st.data_warnings()]
        if st.input_path:
            lines.append(f"- file: {e(st.input_path)}")
        self.summary.object = "\n".join(lines)
        self.config.object = json.loads(json.dumps(info["config"], default=str))
        self.metadata.object = json.loads(json.dumps(info["metadata"], default=str)) or {"metadata": "none"}
