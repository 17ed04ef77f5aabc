"""Start the Lexicell dashboard.

    python run_app.py                                  # demo: pbmc68k_reduced with the default model
    python run_app.py --data my.h5ad [--model DIR] [--port 5006] [--host 0.0.0.0] [--no-show]
    python run_app.py --data my.h5ad --host 0.0.0.0 --basic-auth PASSWORD_OR_FILE --cookie-secret S
    python run_app.py --data my.h5ad --save-dir /srv/lexicell-exports  # the only folder browsers write to
    python run_app.py atlas.h5ad --backed --embeddings atlas.embeds.zarr  # X on disk, precomputed embeddings
    panel serve run_app.py --args --data my.h5ad       # the same, through Panel's own server

This file is the only place that wires the command line to the app (``app.build_app``) and the server
(``panel.serve``). Each browser session gets its own state; the model and each dataset's embeddings are
loaded once per process and shared read-only. Browser sessions write files only into ``--save-dir``
(default: ``lexicell-exports/`` beside the data) and choose file names, never paths (``app.files``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_app.py", description="Lexicell: explore single cells in plain language.")
    p.add_argument("dataset", nargs="?", metavar="DATA", help="dataset (the same as --data)")
    p.add_argument("--data", help="dataset (.h5ad, 10x .h5/.mtx folder, table); default: the bundled demo")
    p.add_argument("--backed", action="store_true",
                   help="large .h5ad/.zarr: keep X on disk (read in row chunks) and serve precomputed embeddings "
                        "(--embeddings, or obsm['transcriptome_embeds'] in the file); they are never computed at "
                        "page load: run python -m engine.embed DATA --out STORE first")
    p.add_argument("--embeddings", metavar="STORE",
                   help="with --backed: zarr store of embeddings written by python -m engine.embed")
    p.add_argument("--model", help="model folder (native Lexicell format); default: the bundled default model")
    p.add_argument("--name", help="dataset name shown in the page")
    p.add_argument("--port", type=int, default=5006, help="port (0 = any free port)")
    p.add_argument("--host", default="localhost", help="address to listen on; 0.0.0.0 shares with your lab")
    p.add_argument("--no-show", action="store_true", help="do not open a browser tab")
    p.add_argument("--save-dir", metavar="DIR",
                   help="the only folder browser sessions write files to (they choose a name, never a path); "
                        "default: a lexicell-exports/ folder beside the data (the demo: in the current folder)")
    p.add_argument("--max-download-mb", type=float, default=200.0, metavar="MB",
                   help="largest .h5ad sent to the browser through the page; larger files stay in --save-dir "
                        "(default 200)")
    p.add_argument("--allow-websocket-origin", action="append", default=None, metavar="HOST[:PORT]",
                   help="extra origins allowed to connect (repeatable), e.g. myserver.lab.org:5006")
    auth = p.add_argument_group("access control (use with --host 0.0.0.0)")
    auth.add_argument("--basic-auth", metavar="PASSWORD|FILE",
                      help="one shared password, or a JSON file of {user: password}; 5 failed logins from one "
                           "address within a minute block it (HTTP 429) for 30 s, doubling with each block; "
                           "logout revokes the login cookie on the server")
    auth.add_argument("--cookie-secret", help="secret to sign login cookies (required for OAuth)")
    auth.add_argument("--oauth-provider", help="OAuth provider passed to Panel (github, google, azure, generic, ...)")
    auth.add_argument("--oauth-key", help="OAuth client id")
    auth.add_argument("--oauth-secret", help="OAuth client secret")
    auth.add_argument("--oauth-redirect-uri", help="OAuth redirect URI")
    auth.add_argument("--oauth-encryption-key", help="key to encrypt OAuth user data in cookies")
    auth.add_argument("--oauth-extra-params", metavar="JSON", help="extra OAuth parameters as a JSON object")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per operation (default 1: a served app runs many short operations at "
                        "once, one per session, and more threads per operation make them contend for the cores; "
                        "a single user embedding a large dataset may gain from 2-4)")
    p.add_argument("--verbose", action="store_true", help="log what the engine does")
    args = p.parse_args(argv)
    if args.dataset and args.data and args.dataset != args.data:
        p.error("give the dataset once: DATA or --data")
    args.data = args.data or args.dataset
    if args.embeddings and not args.backed:
        p.error("--embeddings needs --backed (an in-memory dataset embeds itself, with a cache)")
    if args.backed and not args.data:
        p.error("--backed needs a dataset file (DATA)")
    return args


def check_backed(args: argparse.Namespace) -> str | None:
    """A message when ``--backed`` cannot serve ``args.data`` (no embeddings anywhere), else None.

    Checked before the server starts, by looking into the file (nothing is read): the page would otherwise
    say the same to every visitor.
    """
    if not args.backed or args.embeddings:
        if args.embeddings and not Path(args.embeddings).expanduser().exists():
            return f"--embeddings {args.embeddings}: no such store (python -m engine.embed {args.data} --out STORE)"
        return None
    p = Path(args.data).expanduser()
    if p.suffix != ".h5ad" or not p.is_file():
        return None  # zarr stores and the rest: the page reports what is missing
    import h5py

    with h5py.File(p, "r") as f:
        if "obsm" in f and "transcriptome_embeds" in f["obsm"]:
            return None
    from app.cache import missing_embeddings_error

    return str(missing_embeddings_error(args.data))


def save_dir(args: argparse.Namespace) -> str:
    """The folder browser sessions write to: ``--save-dir``, else ``lexicell-exports/`` beside the data."""
    from app.files import default_save_dir

    return str(Path(args.save_dir).expanduser().resolve() if args.save_dir else default_save_dir(args.data))


def make_app_factory(args: argparse.Namespace):
    """A function building one session's page, for ``pn.serve({"/": factory})``."""
    from app import build_app

    folder = save_dir(args)

    def factory():
        return build_app(args.data, args.model, name=args.name, save_dir=folder,
                         max_download_mb=args.max_download_mb, backed=args.backed, embeddings=args.embeddings)

    return factory


def serve_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments for :func:`panel.serve` from the command line."""
    import json

    kw: dict = dict(port=args.port, address=args.host, show=not args.no_show, title="Lexicell")
    origins = list(args.allow_websocket_origin or [])
    if args.host not in ("localhost", "127.0.0.1") and not origins:
        origins = ["*"] if args.host == "0.0.0.0" else [f"{args.host}:{args.port}"]
    if origins:
        kw["websocket_origin"] = origins
    if args.basic_auth:
        # Lexicell's provider: Panel's login page plus a back-off and revocation on logout (app.auth); login
        # cookies are not copied into the session token embedded in the page.
        from app.auth import LexicellAuthProvider, load_credentials, session_cookie_options

        kw["auth_provider"] = LexicellAuthProvider(load_credentials(args.basic_auth))
        kw.update(session_cookie_options())
    for name in ("cookie_secret", "oauth_provider", "oauth_key", "oauth_secret", "oauth_redirect_uri",
                 "oauth_encryption_key"):
        if getattr(args, name):
            kw[name] = getattr(args, name)
    if args.oauth_extra_params:
        kw["oauth_extra_params"] = json.loads(args.oauth_extra_params)
    if (args.basic_auth or args.oauth_provider) and not args.cookie_secret:
        kw["cookie_secret"] = os.environ.get("LEXICELL_COOKIE_SECRET") or os.urandom(24).hex()
    return kw


def set_threads(n: int | None) -> None:
    """Torch's threads per operation (``--threads``)."""
    if n:
        import torch

        torch.set_num_threads(max(1, int(n)))


def warm_up(args: argparse.Namespace) -> None:
    """Prepare in background threads while the server starts.

    First the dataset and the plotting kernels (datashader's numba compilation), which the first paint
    needs; then the model, the embeddings, the neighbour-smoothed embeddings of zero-shot labelling and the
    DE test's kernels (:func:`app.cache.warm_de`).
    """
    import threading

    from app import cache
    from engine.tools.layout import LARGE_LAYOUT_FROM

    data_future = cache.dataset_future(args.data, backed=args.backed, embeddings=args.embeddings, model=args.model)
    log = logging.getLogger("lexicell")

    def plots():
        from app import plots as _plots

        _plots.warm_up()

    plot_thread = threading.Thread(target=plots, name="lexicell-warm-plots", daemon=True)
    plot_thread.start()

    def model_and_embeddings():
        try:
            adata = data_future.result()
            plot_thread.join()
            model = cache.model_future(args.model).result()
            job = cache.embedding_job(adata, model)
            if job is not None:
                job.future.result()
            # the neighbour graph behind smoothed zero-shot labels (compiles numba kernels: ~15 s once per
            # process, holding the interpreter), so no user's first zero-shot run freezes every page; an atlas
            # served backed starts with smoothing off (its graph takes minutes), computed when a user asks
            if not (args.backed and adata.n_obs >= LARGE_LAYOUT_FROM):
                cache.smoothed_key(adata, None, model)
            cache.warm_de(adata)  # the DE test's numba kernels (compiled once per installation)
        except Exception as err:  # noqa: BLE001 - the page shows errors to the user
            log.warning("warm-up: %s", err)
        freeze_startup_objects()

    threading.Thread(target=model_and_embeddings, name="lexicell-warm-model", daemon=True).start()


def freeze_startup_objects() -> None:
    """Move the objects alive after the warm-up (modules, the model, the dataset: about 700,000 on the demo)
    out of reach of Python's cycle collector (:func:`gc.freeze`).

    They live as long as the server; each full collection (Python's own, and the one after a session closes)
    walked all of them while holding the interpreter, about 1 s under load, which every page waited for. Only
    the sessions' objects are walked now. Objects of a page open at that moment are frozen with them (never
    collected if they form cycles): at most the pages opened during the warm-up.
    """
    import gc

    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if os.environ.get("LEXICELL_DEBUG"):
        logging.getLogger("app").setLevel(logging.DEBUG)
    set_threads(args.threads)
    import panel as pn

    from app.files import clean_stale_partials, ensure_dir
    from engine.errors import LexicellError

    problem = check_backed(args)
    if problem:
        print(f"Lexicell: {problem}", file=sys.stderr, flush=True)
        return 2
    folder = save_dir(args)
    try:
        clean_stale_partials(ensure_dir(folder))  # created with the process's umask
        print(f"Lexicell: browser sessions save files in {folder}", flush=True)
    except LexicellError as err:
        print(f"Lexicell: warning: {err}", file=sys.stderr, flush=True)
    warm_up(args)
    try:
        kw = serve_kwargs(args)
    except LexicellError as err:
        print(f"Lexicell: {err}", file=sys.stderr, flush=True)
        return 2
    url_host = "localhost" if args.host in ("0.0.0.0", "localhost") else args.host
    print(f"Lexicell: serving on http://{url_host}:{args.port}/ (Ctrl+C to stop)", flush=True)
    pn.serve({"/": make_app_factory(args)}, **kw)
    return 0


if __name__.startswith("bokeh"):
    # `panel serve run_app.py --args ...`: this module runs once per session.
    _args = parse_args(sys.argv[1:])
    set_threads(_args.threads)
    make_app_factory(_args)().servable(title="Lexicell")
elif __name__ == "__main__":
    sys.exit(main())
