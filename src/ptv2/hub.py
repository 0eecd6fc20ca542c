"""Reaching the Hugging Face hub: one short probe before the first hub call of a process.

Without it, a machine that cannot reach the hub waits through the hub clients' retries (about half a minute and 22
retry lines for one dataset) before their error. With it, an unreachable hub costs at most PROBE_TIMEOUT_S: the
clients are switched to their local cache, as HF_HUB_OFFLINE=1 would (a cached model or dataset still loads), and a
load that then fails says how to run without the hub (`OFFLINE_FIXES`).
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
TRUE_VALUES = ("1", "ON", "YES", "TRUE")

_state: dict[str, bool] = {}  # "reachable": the probe's answer (once per process); "switched": cache-only now


def offline_requested() -> bool:
    """Whether the user asked for the hub cache only (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(name, "").upper() in TRUE_VALUES for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def endpoint() -> tuple[str, int]:
    """(host, port) of the hub the clients talk to (HF_ENDPOINT, else huggingface.co)."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds (probed once per process)."""
    if "reachable" not in _state:
        try:
            socket.create_connection(endpoint(), timeout=timeout).close()
            _state["reachable"] = True
        except OSError:
            _state["reachable"] = False
    return _state["reachable"]


def is_offline() -> bool:
    """Whether hub calls read only the local cache: asked for, or switched by `prepare` after a failed probe."""
    return offline_requested() or _state.get("switched", False)


def prepare() -> None:
    """Call before a hub call: probes the hub once; if it does not answer, switches huggingface_hub, transformers
    and datasets to their local cache for the rest of the process, with one log line."""
    if offline_requested():
        _cache_only()  # the clients read the variable when imported, perhaps before it was set (in-process runs)
        return
    if _state.get("switched") or reachable():
        return
    _cache_only()
    _state["switched"] = True
    host, port = endpoint()
    log.warning(
        "the Hugging Face hub (%s:%s) did not answer within %gs: reading only the local hub cache "
        "(HF_HUB_OFFLINE=1 skips this probe)", host, port, PROBE_TIMEOUT_S,
    )  # fmt: skip


def _cache_only() -> None:
    """huggingface_hub, transformers and datasets read only their local cache from now on in this process."""
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True  # datasets copies the flag at import
    except ImportError:
        pass


def fixes(local: str, packaged: str | None = "backbone=minilm") -> str:
    """The one place that says how to run without the hub; `local` is the caller's local-folder override, `packaged`
    the packaged alternative where there is one (a backbone; none for data). The HF_HUB_OFFLINE=1 advice is left
    out where it is already in force or the hub is known unreachable (it would change nothing)."""
    cache = "" if is_offline() else ", or set HF_HUB_OFFLINE=1 to read only the hub cache"
    alternative = f" or use the packaged {packaged}" if packaged else ""
    return f"without the hub, pass {local}{alternative}{cache}"


def reason(error: Exception) -> str:
    """Why a hub load failed, for the error line: the cause when the hub was not in reach, else the client's first
    line."""
    if offline_requested():
        return "HF_HUB_OFFLINE is set and the hub cache has no copy"
    if _state.get("switched"):
        return "the Hugging Face hub is unreachable and the hub cache has no copy"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__
