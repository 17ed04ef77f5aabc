"""A lab server you can trust: confined atomic writes, downloads off the event loop, login back-off and
revocation, closed sessions freed (issue 18 item 1; issue 20 items 2, 4 and 8).

No browser here (the browser check of the Save pane is in ``tests/test_ui.py``): app state and views are driven
directly, auth and sessions through a real Panel server on a free port with ``requests``.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest

from engine.errors import DataError

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]





@pytest.fixture
def served_state(demo, tmp_path):
    """A session's state as the served app builds it: writes confined to ``tmp_path / 'exports'``."""
    from app import cache
    from app.state import AppState

    base, model = demo
    data = tmp_path / "data" / "pbmc.h5ad"
    data.parent.mkdir()
    data.write_bytes(b"input")
    return AppState(cache.session_adata(base), model, dataset_name="demo", input_path=str(data),
                    save_dir=str(tmp_path / "exports"))


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ====================================================================== names (issue 18 item 1)
HOSTILE_NAMES = [
    ("results", "results.h5ad"),
    ("results.h5ad", "results.h5ad"),
    ("Results.H5AD", "Results.h5ad"),
    ("../escape.h5ad", "escape.h5ad"),
    ("../../../../etc/passwd", "etc_passwd.h5ad"),
    ("/etc/cron.d/evil", "etc_cron.d_evil.h5ad"),
    ("/abs/path/x.h5ad", "abs_path_x.h5ad"),
    ("..\\..\\windows\\x.h5ad", "windows_x.h5ad"),
    ("sub/dir/name.h5ad", "sub_dir_name.h5ad"),
    (".bashrc", "bashrc.h5ad"),
    (".hidden.h5ad", "hidden.h5ad"),
    ("...x", "x.h5ad"),
    ("a..b", "a.b.h5ad"),
    ("-rf", "rf.h5ad"),
    ("~/x", "x.h5ad"),
    ("$HOME/x", "HOME_x.h5ad"),
    ("name with spaces.h5ad", "name_with_spaces.h5ad"),
    ("x\x00y", "x_y.h5ad"),
    ("x\ny\r\tz", "x_y_z.h5ad"),
    ("<script>alert(1)</script>", "script_alert_1_script.h5ad"),
    ("café", "cafe.h5ad"),
    ("CON", "file_CON.h5ad"),
    ("nul.h5ad", "file_nul.h5ad"),
    ("x" * 5000, "x" * 115 + ".h5ad"),
    ("file:///etc/x", "file_etc_x.h5ad"),
    ("name.csv", "name.csv.h5ad"),
]


@pytest.mark.parametrize("typed, expected", HOSTILE_NAMES)
def test_safe_name_table(typed, expected):
    from app.files import MAX_NAME, safe_name

    name = safe_name(typed)
    assert name == expected
    assert "/" not in name and "\\" not in name and not name.startswith(".") and ".." not in name
    assert len(name) <= MAX_NAME and name.isascii() and name.endswith(".h5ad")


@pytest.mark.parametrize("typed", ["", "   ", ".", "..", "../..", "///", "\x00", "🙂🙂", "._-", ".h5ad"])
def test_safe_name_refuses_names_with_nothing_left(typed):
    from app.files import safe_name

    with pytest.raises(DataError, match="No usable file name"):
        safe_name(typed)


# ====================================================================== atomic, numbered writes
def test_numbered_suffix_never_overwrites(tmp_path):
    from app.files import write_atomic

    def writer(text):
        return lambda p: p.write_text(text)

    paths = [write_atomic(tmp_path, "out.h5ad", writer(f"v{i}")) for i in range(4)]
    assert [p.name for p in paths] == ["out.h5ad", "out-1.h5ad", "out-2.h5ad", "out-3.h5ad"]
    assert [p.read_text() for p in paths] == ["v0", "v1", "v2", "v3"]
    with pytest.raises(DataError, match="already exists"):  # Jupyter semantics: an error, never a replacement
        write_atomic(tmp_path, "out.h5ad", writer("again"), numbered=False)
    assert (tmp_path / "out.h5ad").read_text() == "v0"
    with pytest.raises(DataError, match="not a path"):
        write_atomic(tmp_path, "../out.h5ad", writer("x"))


def test_failure_mid_write_leaves_nothing(tmp_path):
    from app.files import write_atomic

    (tmp_path / "keep.h5ad").write_text("old")

    def half(p):
        p.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    for name in ("new.h5ad", "keep.h5ad"):
        with pytest.raises(DataError, match="No space left"):
            write_atomic(tmp_path, name, half)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.h5ad"]
    assert (tmp_path / "keep.h5ad").read_text() == "old"


def test_kill_mid_write_leaves_no_file_and_the_partial_is_cleaned(tmp_path):
    """A process killed (SIGKILL) while writing leaves no file of the name; the next save removes its temp file."""
    from app.files import clean_stale_partials, write_atomic

    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from app.files import write_atomic
        def slow(p):
            with open(p, "wb") as f:
                f.write(b"x" * 100000)
                f.flush()
                time.sleep(60)
        write_atomic({str(tmp_path)!r}, "big.h5ad", slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".big.h5ad.*.partial")) and time.time() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".big.h5ad.*.partial")), "the writer never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert not (tmp_path / "big.h5ad").exists()
    own = write_atomic(tmp_path, "mine.h5ad", lambda p: p.write_text("ok"))  # a live save is never touched
    removed = clean_stale_partials(tmp_path)
    assert len(removed) == 1 and removed[0].name.startswith(".big.h5ad.")
    assert sorted(p.name for p in tmp_path.iterdir()) == [own.name]


# ====================================================================== the served app's Save pane
@pytest.mark.parametrize("typed", ["../outside.h5ad", "/tmp/abs.h5ad", "sub/dir/x.h5ad", "..", "pbmc.h5ad"])
def test_served_save_writes_only_inside_the_save_dir(served_state, tmp_path, typed):
    before = _all_files(tmp_path)
    if typed == "..":
        with pytest.raises(DataError, match="No usable file name"):
            served_state.save_h5ad(typed)
        assert _all_files(tmp_path) == before
        return
    out = served_state.save_h5ad(typed)
    save_dir = (tmp_path / "exports").resolve()
    assert out.parent == save_dir and out.is_file()
    assert _all_files(tmp_path) - before == {out}  # one new file, in the save dir, nothing else
    assert (tmp_path / "data" / "pbmc.h5ad").read_bytes() == b"input"  # the input is untouched


def test_served_save_numbers_existing_names(served_state, tmp_path):
    import anndata as ad

    a = served_state.save_h5ad("run")
    served_state.run_query("B cells")
    served_state.keep_query("b_score")
    b = served_state.save_h5ad("run.h5ad")
    assert (a.name, b.name) == ("run.h5ad", "run-1.h5ad")
    assert "b_score" not in ad.read_h5ad(a).obs and "b_score" in ad.read_h5ad(b).obs


def test_save_pane_in_served_mode(served_state, tmp_path):
    """The Save pane's text box is a name; whatever is typed, the file lands in the save dir."""
    from app.views.export import ExportView

    view = ExportView(served_state)
    assert view.path.value == "pbmc_lexicell.h5ad" and "export folder" in view.path.name
    view.path.value = "../../../escape"
    asyncio.run(view._save())
    assert not view.job.alert.visible, view.job.alert.object
    out = tmp_path / "exports" / "escape.h5ad"
    from app.views.common import plain

    assert out.is_file() and plain("escape.h5ad") in view.saved.object
    assert not list(tmp_path.parent.glob("escape*")) and not list(tmp_path.glob("escape*"))


def test_jupyter_explorer_still_writes_where_the_caller_says(demo, tmp_path):
    from app import cache
    from app.state import AppState

    base, model = demo
    st = AppState(cache.session_adata(base), model)  # no save_dir: notebook semantics
    target = tmp_path / "my" / "place"
    target.mkdir(parents=True)
    assert st.save_h5ad(target / "x") == target / "x.h5ad"


def test_build_app_defaults_to_exports_beside_the_data(tmp_path):
    import run_app
    from app.files import default_save_dir

    data = tmp_path / "d" / "cells.h5ad"
    assert default_save_dir(data) == (tmp_path / "d" / "lexicell-exports").resolve()
    assert default_save_dir(None) == Path.cwd() / "lexicell-exports"
    args = run_app.parse_args(["--data", str(data)])
    assert run_app.save_dir(args) == str((tmp_path / "d" / "lexicell-exports").resolve())
    args = run_app.parse_args(["--data", str(data), "--save-dir", str(tmp_path / "out")])
    assert run_app.save_dir(args) == str((tmp_path / "out").resolve())


# ====================================================================== download (issue 20 item 2)
def test_download_is_written_off_the_event_loop_into_the_save_dir(served_state, tmp_path, monkeypatch):
    from app.views.export import ExportView

    threads = []
    orig = type(served_state)._write_h5ad

    def spy(self, path):
        threads.append(threading.current_thread())
        orig(self, path)

    monkeypatch.setattr(type(served_state), "_write_h5ad", spy)
    view = ExportView(served_state)
    asyncio.run(view._prepare_download())
    assert threads and threads[0] is not threading.main_thread()  # the event loop ran in the main thread
    assert view.h5ad_download.visible and not view.download_job.alert.visible
    f = Path(view.h5ad_download.file)
    assert f.parent == (tmp_path / "exports").resolve() and f.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert view.h5ad_download.data is None  # nothing is base64-encoded until the user clicks Download


def test_large_download_is_refused_and_kept_on_the_server(served_state, tmp_path):
    from app.views.export import ExportView

    served_state.max_download_bytes = 1000  # the demo's .h5ad is far larger
    view = ExportView(served_state)
    asyncio.run(view._prepare_download())
    assert not view.h5ad_download.visible and view.h5ad_download.file is None
    assert view.download_job.alert.visible and view.download_job.alert.alert_type == "warning"
    assert "limit for downloads" in view.download_job.alert.object
    kept = list((tmp_path / "exports").glob("*.h5ad"))
    assert len(kept) == 1 and kept[0].name in view.download_job.alert.object.replace("\\", "")


def test_jupyter_download_uses_a_temporary_folder(demo):
    from app import cache
    from app.state import AppState

    base, model = demo
    st = AppState(cache.session_adata(base), model)
    st.download_file()
    second = st.download_file()
    folder = second.parent
    assert second.is_file() and list(folder.iterdir()) == [second]  # the previous download is replaced
    st.close()
    assert not folder.exists()


# ====================================================================== login (issue 20 item 4)
def test_throttle_blocks_after_five_failures_for_a_growing_period():
    from app.auth import LoginThrottle

    now = [1000.0]
    t = LoginThrottle(max_failures=5, window=60, base_block=30, max_block=3600, clock=lambda: now[0])
    for _ in range(4):
        assert t.failure("1.2.3.4") == 0
    assert t.failure("1.2.3.4") == 30 and t.retry_after("1.2.3.4") == 30
    assert t.retry_after("5.6.7.8") == 0  # per client
    now[0] += 31
    assert t.retry_after("1.2.3.4") == 0
    blocks = []
    for _ in range(3):
        for _ in range(5):
            b = t.failure("1.2.3.4")
        blocks.append(b)
        now[0] += b + 1
    assert blocks == [60, 120, 240]
    for _ in range(4):  # failures spread over more than a minute never block
        t.failure("9.9.9.9")
        now[0] += 20
    assert t.failure("9.9.9.9") == 0
    t.success("1.2.3.4")
    assert t.retry_after("1.2.3.4") == 0


def test_throttle_memory_is_bounded():
    from app.auth import LoginThrottle

    t = LoginThrottle(max_clients=100)
    for i in range(1000):
        t.failure(f"10.0.{i // 256}.{i % 256}")
    assert len(t) <= 100


def test_password_file_and_constant_time_check(tmp_path):
    from app.auth import check_password, load_credentials
    from engine.errors import ConfigError

    f = tmp_path / "users.json"
    f.write_text(json.dumps({"alice": "pw-a", "bob": "pw-b"}))
    creds = load_credentials(str(f))
    assert check_password(creds, "alice", "pw-a") and not check_password(creds, "alice", "pw-b")
    assert not check_password(creds, "mallory", "pw-a")
    assert check_password(load_credentials("shared"), "anyone", "shared")
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError):
        load_credentials(str(f))


@pytest.fixture(scope="module")
def auth_server():
    """A real Panel server behind Lexicell's basic-auth provider (a trivial page), on a free port."""
    import panel as pn

    import run_app

    args = run_app.parse_args(["--basic-auth", "right-password", "--cookie-secret", "s" * 32, "--no-show",
                               "--host", "127.0.0.1", "--port", str(free_port())])
    kw = run_app.serve_kwargs(args)
    kw.update(threaded=True, show=False)
    server = pn.serve({"/": lambda: pn.pane.Markdown("SECRET PAGE")}, **kw)
    url = f"http://127.0.0.1:{args.port}"
    import requests

    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            requests.get(url + "/login", timeout=2)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    yield url, kw["auth_provider"]
    server.stop()


def _login(url, password, user="alice"):
    import requests

    s = requests.Session()
    r = s.post(url + "/login", data={"username": user, "password": password}, allow_redirects=False, timeout=10)
    return s, r


def test_login_back_off_returns_429(auth_server):
    url, provider = auth_server
    provider.throttle.success("127.0.0.1")
    codes = [_login(url, f"wrong-{i}")[1].status_code for i in range(7)]
    assert codes[:4] == [302] * 4 and codes[4:] == [429] * 3, codes
    _, r = _login(url, "right-password")  # blocked: even the right password waits
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "Try again" in r.text
    provider.throttle.success("127.0.0.1")  # as if the block had run out
    s, r = _login(url, "right-password")
    assert r.status_code == 302 and "user" in s.cookies


def test_logged_out_cookie_is_refused(auth_server):
    import requests

    url, provider = auth_server
    provider.throttle.success("127.0.0.1")
    assert "SECRET PAGE" not in requests.get(url + "/", timeout=10).text  # no cookie: login page
    s, r = _login(url, "right-password", user="bob")
    assert r.status_code == 302
    old = dict(s.cookies)
    page = s.get(url + "/", timeout=10)
    assert page.status_code == 200 and "/login" not in page.url
    s.get(url + "/logout", timeout=10)
    replay = requests.get(url + "/", cookies=old, allow_redirects=False, timeout=10)
    assert replay.status_code in (302, 401, 403) and "SECRET PAGE" not in replay.text
    assert "login" in replay.headers.get("Location", "login")
    s2, r2 = _login(url, "right-password", user="bob")  # logging in again at once works (a new cookie)
    assert r2.status_code == 302 and s2.cookies["user"] != old["user"]
    assert s2.get(url + "/", timeout=10).status_code == 200


def test_login_cookies_stay_out_of_the_page(auth_server):
    import re

    from bokeh.util.token import get_token_payload

    url, provider = auth_server
    provider.throttle.success("127.0.0.1")
    s, _ = _login(url, "right-password")
    html = s.get(url + "/", timeout=10).text
    values = [v for k, v in s.cookies.items() if k in ("user", "id_token")]
    assert values and not any(v in html for v in values)
    tokens = re.findall(r'"token"\s*:\s*"([A-Za-z0-9_.\-]+)"', html) + re.findall(r"token=([A-Za-z0-9_.\-]+)", html)
    assert tokens, "no session token found in the page"
    for tok in tokens:
        payload = get_token_payload(tok)
        assert not set(payload.get("cookies", {})) & {"user", "id_token"}
        assert not {k.lower() for k in payload.get("headers", {})} & {"cookie", "authorization"}


def _raw_upgrade(url: str, path: str, cookie: str | None = None) -> str:
    """Send a raw websocket upgrade for ``path``; returns the HTTP status line the server answers."""
    import base64
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {u.netloc}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", f"Origin: {url}"]
    if cookie:
        lines.append(f"Cookie: {cookie}")
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return sock.recv(4096).decode("latin-1").split("\r\n", 1)[0]


def test_every_route_refuses_clients_without_the_login_cookie(auth_server):
    """Issue 18 item 3: without a login (and after a wrong password) the page, the websocket (also with a
    session token copied from a logged-in page), autoload.js, metadata and component resources are refused;
    only Bokeh/Panel's public JavaScript and CSS and the login page answer. Downloads travel through the
    websocket (no HTTP route serves the save folder), so the websocket refusal covers them."""
    import re

    import requests

    url, provider = auth_server
    provider.throttle.success("127.0.0.1")
    logged, r = _login(url, "right-password", user="carol")
    assert r.status_code == 302
    page = logged.get(url + "/", timeout=10).text
    assert "SECRET PAGE" in page or "bokeh" in page.lower()
    token = (re.findall(r'"token"\s*:\s*"([A-Za-z0-9_.\-]+)"', page) + re.findall(r"token=([A-Za-z0-9_.\-]+)", page))[0]
    cookie = "; ".join(f"{k}={v}" for k, v in logged.cookies.items())
    # the websocket: refused without the cookie, even with a valid session token; accepted with it
    for path in ("/ws", f"/ws?bokeh-session-id=x&token={token}"):
        status = _raw_upgrade(url, path)
        assert " 101 " not in status + " " and status.split()[1] in ("302", "401", "403"), (path, status)
    assert " 101 " in _raw_upgrade(url, "/ws", cookie) + " "
    wrong, r = _login(url, "wrong-password", user="carol")  # a wrong password gets no cookie
    assert r.status_code == 302 and "user" not in wrong.cookies
    provider.throttle.success("127.0.0.1")
    for client in (requests.Session(), wrong):
        for path in ("/", "/?x=1", "/autoload.js?bokeh-autoload-element=1&bokeh-absolute-url=" + url, "/metadata",
                     "/components/panel/models/tabulator/tabulator.min.js", "/lexicell-exports/",
                     "/static/../../run_app.py", "/favicon.ico/../"):
            resp = client.get(url + path, allow_redirects=False, timeout=10)
            assert resp.status_code in (302, 401, 403, 404), (path, resp.status_code)
            assert "SECRET PAGE" not in resp.text and token not in resp.text
            if resp.status_code == 302:
                assert "login" in resp.headers["Location"], (path, resp.headers["Location"])
    # public: the login page and Bokeh's own JavaScript (no data)
    assert requests.get(url + "/login", timeout=10).status_code == 200
    js = requests.get(url + "/static/js/bokeh.min.js", timeout=10)
    assert js.status_code == 200 and "SECRET PAGE" not in js.text


# ====================================================================== closed sessions (issue 20 item 8)
def test_closed_sessions_free_their_state(demo, tmp_path):
    """Sessions opened on a real server, used, then closed: the registry empties and their state is freed."""
    import panel as pn
    import requests

    from app import cache
    from app.layout import SESSIONS, build_app

    base, model = demo
    cache.put_dataset("lab-demo", base)
    cache.put_model("lab-tiny", model)
    port = free_port()
    server = pn.serve({"/": lambda: build_app("lab-demo", "lab-tiny", name="demo", save_dir=str(tmp_path))},
                      port=port, address="127.0.0.1", threaded=True, show=False,
                      # a session nobody connects to expires this long after its page was built: long enough
                      # for the pages below to be built and used first on a slow machine (with 5 s, a session
                      # built early expired before its turn on a machine running three times slower, 2026-12-04)
                      check_unused_sessions_milliseconds=200, unused_session_lifetime_milliseconds=20000)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                requests.get(url, timeout=30)  # each GET builds one session; none connects, so all expire
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        for _ in range(2):
            assert requests.get(url, timeout=30).status_code == 200
        ids = {sid for sid, ex in SESSIONS.items() if not ex._closed}
        explorers = [SESSIONS[sid] for sid in ids]
        assert explorers
        refs = []
        for ex in explorers:
            # as a browser's click would: on the server's loop, holding the page's lock (changing a served page
            # from another thread raises in Bokeh, and the kept traceback would keep the session alive)
            done = threading.Event()

            def use(ex=ex, done=done):
                try:
                    ex.state.run_query("B cells")
                    ex.state.keep_query("kept")
                finally:
                    done.set()

            ex.document().add_next_tick_callback(use)
            assert done.wait(30) and "kept" in ex.state.adata.obs
            refs.append((weakref.ref(ex.state), ex))
        del use
        del explorers, ex
        deadline = time.time() + 60
        while ids & set(SESSIONS) and time.time() < deadline:
            time.sleep(0.1)
        assert not ids & set(SESSIONS)
        for ref, ex in refs:  # closed: results dropped at once, without waiting for the garbage collector
            assert ex._closed and ex.state.adata is None and ex.state.history == [] and ex.state.scores is None
        del ex
        states = [r for r, _ in refs]
        refs.clear()
        gc.collect()
        live_docs = [d for d in (*pn.state._locations, *pn.state._periodic) if getattr(d, "session_context", None)]
        assert not ids & {d.session_context.id for d in live_docs}  # Panel's per-document registries too
        assert all(r() is None for r in states)  # and the emptied state objects themselves are collected
    finally:
        server.stop()
        cache.clear()


def test_explorer_close_cancels_jobs_and_frees_downloads(demo):
    from app.layout import Explorer

    base, model = demo
    ex = Explorer(base, model, name="demo")
    p = ex.state.download_file()
    ex.close()
    assert ex._closed and not p.parent.exists() and all(j._cancel.is_set() for j in ex.jobs())
    ex.close()  # twice is harmless
    assert os.path.isdir(os.getcwd())
