"""The floor of `freshrec bench serving`: a bare FastAPI app that only does exact top-10.

    FLOOR_ITEMS=100000 FLOOR_DIM=129 uvicorn bench.floor:app --port 8001

Same N x d float32 matrix shape and the same one torch thread as the API, same route shape
(GET /recommend?user_id=..&k=10, pydantic response); no Redis, no Kafka, no model, no history:
the query is a fixed random vector per user id. Whatever freshrec does beyond this is overhead
the benchmark reports as a ratio against it.
"""

from __future__ import annotations

import os
import zlib
from typing import Annotated

import torch
from fastapi import FastAPI, Query
from pydantic import BaseModel

N = int(os.environ.get("FLOOR_ITEMS", "100000"))
D = int(os.environ.get("FLOOR_DIM", "129"))
torch.set_num_threads(int(os.environ.get("FRESHREC_TORCH_THREADS", "1")))
_gen = torch.Generator().manual_seed(0)
MATRIX = torch.randn(N, D, generator=_gen)  # (N, d)
NAMES = [str(i) for i in range(N)]

app = FastAPI(title="freshrec floor")


class Scored(BaseModel):
    item_id: str
    score: float


class Out(BaseModel):
    user_id: str
    items: list[Scored]


@app.get("/recommend", response_model=Out)
def recommend(user_id: Annotated[str, Query(min_length=1, max_length=256)],
              k: Annotated[int, Query(ge=1, le=100)] = 10) -> Out:
    """Exact top-k of a per-user random query over the whole matrix."""
    gen = torch.Generator().manual_seed(zlib.crc32(user_id.encode()))
    q = torch.randn(1, D, generator=gen)
    with torch.no_grad():
        top = (q @ MATRIX.T).topk(k, dim=1)
    return Out(user_id=user_id, items=[Scored(item_id=NAMES[j], score=float(v)) for v, j in
                                       zip(top.values[0].tolist(), top.indices[0].tolist(),
                                           strict=True)])


@app.get("/healthz")
def healthz() -> dict[str, int]:
    return {"items": N}
