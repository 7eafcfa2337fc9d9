"""Settings of the API server (FRESHREC_* environment variables), loaded once in the lifespan."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from protocol.settings import CommonSettings


class ServiceSettings(CommonSettings):
    """The API server never trains and never writes weights; it reads and verifies them."""

    api_token: SecretStr = SecretStr("")  # bearer token of the write endpoints; "" disables them
    admin_token: SecretStr = SecretStr("")  # bearer token of /admin/* (rollback); "" disables
    encoder_path: str = ""  # must be the trainer's base encoder (checked against each manifest)
    redis_timeout_s: float = 2.0  # a request waits at most this long on Redis, then serves
    # the user's last known history (the consumers wait longer: they only retry)
    poll_interval_s: float = 0.5  # how often the pointer and the catalog log are polled
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    user_cache_size: int = 100_000  # last known histories, served while Redis is down
    # events this replica accepted are merged into the user's history for this long (until the
    # features consumer has applied them): read-your-writes; 0 turns it off
    recent_events_s: float = 2.0
    loader_stuck_s: float = 120.0  # /healthz fails once one model refresh runs this long
    torch_threads: int = 1  # per-request matmuls are small; one thread keeps latency flat
    # how long a thread may hold the GIL while another waits for it (sys.setswitchinterval).
    # A request crosses threads several times (event loop, the route's worker, Redis replies),
    # each time waiting out whichever thread runs Python code: the model loader's swap, another
    # request's scoring. Python's 5 ms is kept: 1 ms moved neither the p99 nor the throughput
    # beyond the run-to-run spread at 100k items (bench/RESULTS.md, "Issue 8, session 11")
    gil_switch_ms: float = Field(5.0, gt=0, le=1000)
    log_level: str = "WARNING"  # freshrec.service's own log (INFO: every swap, the ANN index)
    # how the served item matrix is stored: fp32, fp16, or int8 with a scale per row
    # (model/quant.py; memory, latency and recall of each in bench/RESULTS.md)
    item_dtype: Literal["fp32", "fp16", "int8"] = "fp32"
    # top-k candidates from an incrementally updated faiss IVF index (service/ann.py) once the
    # catalog has this many items (linear item tower, faiss-cpu installed), if tuning measures
    # it 1.5x faster than the exact scan at ann_recall (else exact); 0 = never. 50k: the
    # measured crossover on clustered text (1.0x at 20k, 1.7x at 50k, 5-7x at 100k, 20-35x at
    # 1M: bench/RESULTS.md); on i.i.d. random text it only starts to pay near 1M
    ann_min_items: int = 50_000
    ann_nprobe: int = 0  # IVF lists searched; 0 = tuned at build time to ann_recall
    ann_recall: float = 0.97  # recall@10 the tuning aims for, on sampled histories
    ann_rebuild_s: float = 300.0  # the index is checked this often; rebuilt if it fits no more
    # served recall@10 measured this often on queries requests searched with (0 = never);
    # checked at once (more lists, else rebuilt) when it falls 0.02 below ann_recall over ~100
    # queries
    ann_monitor_s: float = 10.0
    # from this catalog size, exact top-k of a linear tower's fp32 matrix by faiss's scan,
    # rescored by the model's own columns (same items and scores as torch's scan, 2.2-5.5x
    # faster on this CPU: service/ann.py ExactScan; needs faiss); 0 = torch's scan always
    scan_min_items: int = 10_000
    # concurrent /recommend requests queued while a scan runs are scored as one batch, up to
    # this many (service/batcher.py; measured in bench/RESULTS.md); 1 = one scan per request
    max_batch: int = 64
