"""Saving and downloading the annotated dataset (served: names only, inside ``--save-dir``; see app.files)."""
from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from engine.errors import DataError

from .. import cache, files

__all__ = ["ExportMixin"]


class ExportMixin:
    """Export, save, download and data warnings of an :class:`~app.state.AppState`."""

    def _refuse_backed(self) -> None:
        """Writing an .h5ad copies ``X``: for a backed atlas that would read the whole matrix, so it is refused."""
        if getattr(self, "backed", False):
            raise DataError(
                "This dataset is served backed (its expression stays on disk), so the page does not write it to a "
                "new .h5ad", found=f"a backed dataset of {self.n_cells:,} cells",
                expected="an in-memory dataset",
                fix="download the cell table (obs CSV) and the query scores or zero-shot probabilities CSV below; "
                    "or annotate the file in Python with engine.read(path, backed=True)")

    def export_adata(self) -> ad.AnnData:
        """A writeable shallow copy of the session's dataset (uns cleaned of values h5ad cannot store).

        Raises
        ------
        DataError
            For a backed dataset (writing would load its whole matrix).
        """
        self._refuse_backed()
        out = cache.session_adata(self.adata)
        out.uns = _h5ad_safe(dict(self.adata.uns))
        return out

    def save_h5ad(self, path: str | Path) -> Path:
        """Write the annotated dataset to a new .h5ad file; nothing is ever overwritten.

        Served (``save_dir`` set, see ``run_app.py --save-dir``): ``path`` is only a *name*. It is cleaned by
        :func:`app.files.safe_name` (no folders, no ``..``, not hidden, at most 120 characters) and the file is
        written inside ``save_dir``; if the name exists the next free ``name-1.h5ad``, ``name-2.h5ad``, ... is used.
        Jupyter (``save_dir`` None): ``path`` is where the caller says, and an existing file is an error.

        Either way the file is written under a temporary name in the same folder, flushed to disk and then
        linked to its name (:func:`app.files.write_atomic`), so a crash leaves no partial file of that name and
        two saves of one name at the same time never overwrite each other.

        Returns
        -------
        pathlib.Path
            The file written.

        Raises
        ------
        DataError
            When no usable name is given; when ``path`` is the input file or already exists (Jupyter); when the
            folder is missing or writing fails (disk full, unwritable folder); for a backed dataset.
        """
        if not str(path).strip():
            raise DataError("No file name given", found="an empty path", expected="a new .h5ad file name")
        self._refuse_backed()
        if self.save_dir:
            folder = files.ensure_dir(self.save_dir)
            files.clean_stale_partials(folder)
            name = files.safe_name(str(path))
            return files.write_atomic(folder, name, self._write_h5ad, numbered=True)
        p = Path(str(path)).expanduser()
        if p.suffix != ".h5ad":
            p = p.with_suffix(p.suffix + ".h5ad") if p.suffix else p.with_suffix(".h5ad")
        if self.input_path and p.resolve() == Path(self.input_path).expanduser().resolve():
            raise DataError("Refusing to overwrite the input dataset", found=str(p),
                            expected="a new file name", fix="choose another file name, e.g. add '_annotated'")
        if p.exists():
            raise DataError("The file already exists", found=str(p), expected="a new file name",
                            fix="choose a new file name (files are never overwritten)")
        if not p.parent.is_dir():
            raise DataError("The folder does not exist", found=str(p.parent), expected="an existing folder")
        return files.write_atomic(p.parent, p.name, self._write_h5ad, numbered=False)

    def _write_h5ad(self, path: Path) -> None:
        self.export_adata().write_h5ad(path)

    def save_name(self, text: str) -> str:
        """The file name a served save of ``text`` would use (before numbering); Jupyter: ``text`` unchanged."""
        return files.safe_name(text) if self.save_dir else str(text)

    def data_warnings(self) -> list[str]:
        """Warnings about how the data was read: mouse genes through human orthologs, genes summed, ...

        From ``uns['transcriptome_embeds']['params']['warnings']`` (:func:`engine.embed_cells`) and
        ``uns['lexicell']['validation']['warnings']`` (:func:`engine.validate`), without repeats.
        """
        out: list[str] = []
        emb = self.adata.uns.get(cache.EMBED_KEY)
        params = emb.get("params", {}) if isinstance(emb, dict) else {}
        val = self.adata.uns.get("lexicell")
        val = val.get("validation", {}) if isinstance(val, dict) else {}
        for src in (params.get("warnings"), val.get("warnings") if isinstance(val, dict) else None):
            if src is None or isinstance(src, str):
                src = [src] if src else []
            out += [str(w) for w in src if str(w) and str(w) not in out]
        return out

    def notify_data_warnings(self) -> None:
        """Show :meth:`data_warnings` in the page (once the embeddings are there)."""
        notes = self.data_warnings()
        if notes and self.embeds_ready:
            self.notify("Note: " + " ".join(notes), "warning")

    def h5ad_bytes(self) -> bytes:
        """The annotated dataset as .h5ad bytes (notebooks; the page downloads through :meth:`download_file`)."""
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "export.h5ad"
            self.export_adata().write_h5ad(f)
            return f.read_bytes()

    def download_file(self, name: str | None = None) -> Path:
        """Write the annotated dataset to a file for a browser download; returns its path.

        Served (``save_dir`` set): a new file in the export folder, exactly as :meth:`save_h5ad` would write it
        (it stays there, also when it is too large to send through the page). Jupyter: a temporary folder of
        this session, replacing the previous download. Run it off the event loop (the write takes seconds on
        large data); nothing is held in memory beyond the written file.

        Raises
        ------
        DataError
            When writing fails (see :meth:`save_h5ad`).
        """
        self._refuse_backed()
        name = name or f"{_file_stem(self)}_lexicell.h5ad"
        if self.save_dir:
            return self.save_h5ad(name)
        import tempfile

        if self._download_dir is None:
            self._download_dir = tempfile.TemporaryDirectory(prefix="lexicell-download-")
        folder = Path(self._download_dir.name)
        for old in folder.iterdir():
            old.unlink(missing_ok=True)
        return files.write_atomic(folder, files.safe_name(name), self._write_h5ad, numbered=True)

    def download_too_large(self, path: Path) -> str | None:
        """None when ``path`` may be sent through the page, else the message shown instead."""
        size = Path(path).stat().st_size
        if size <= self.max_download_bytes:
            return None
        mb, limit = size / 2**20, self.max_download_bytes / 2**20
        if self.save_dir:
            return (f"The file is {mb:,.0f} MB, above the {limit:,.0f} MB limit for downloads through the page. "
                    f"It was saved on the server instead, as {path.name} in the export folder ({path.parent}).")
        Path(path).unlink(missing_ok=True)
        return (f"The file is {mb:,.0f} MB, above the {limit:,.0f} MB limit for downloads through the page. "
                "Use Save .h5ad to write it to a file instead.")

    def close(self) -> None:
        """Free what this session holds outside its own objects (a download's temporary folder)."""
        if self._download_dir is not None:
            self._download_dir.cleanup()
            self._download_dir = None
        self._gene_cache = None



def _file_stem(state) -> str:
    """A file-name-safe stem for exports, from the input file or the dataset name."""
    name = Path(state.input_path).stem if state.input_path else state.dataset_name
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_.") or "dataset"



def _h5ad_safe(obj):
    """Recursively drop None values and turn unsupported scalars into strings so anndata can write ``uns``."""
    if isinstance(obj, dict):
        return {str(k): _h5ad_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        items = [x for x in obj if x is not None]
        if items and all(isinstance(x, (str, int, float, bool, np.number, np.bool_)) for x in items):
            if all(isinstance(x, str) for x in items) or all(not isinstance(x, str) for x in items):
                return np.asarray(items)
            return np.asarray([str(x) for x in items])
        if not items:
            return np.asarray([], dtype=str)
        return {str(i): _h5ad_safe(x) for i, x in enumerate(items)}
    if isinstance(obj, pd.DataFrame):
        df = obj.copy()
        df.attrs = {}
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = df[c].astype(str)
        return df
    if isinstance(obj, (str, int, float, bool, np.ndarray, np.number, np.bool_)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    try:
        import scipy.sparse as sp

        if sp.issparse(obj):
            return obj
    except ImportError:  # pragma: no cover
        pass
    return str(obj)
