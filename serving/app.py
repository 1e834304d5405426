"""The ranking service: a Ray Serve deployment with a FastAPI ingress.

``POST /predict {"user_id": 7, "item_ids": [1, 2, 3]}`` returns, for every item, each task's probability and
the version of the model that produced them. Features come from the online store in one lookup per
request; weights come from the snapshot directory through :class:`serving.weights.WeightFollower`, so new
snapshots are picked up without redeploying (redeploying would restart replicas).
"""


import os
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from ray import serve

from features.store import FeatureStoreConfig, OnlineFeatures
from serving.weights import WeightFollower

EntityId = Annotated[StrictInt, Field(ge=0, lt=2**62)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: EntityId
    item_ids: list[EntityId] = Field(min_length=1, max_length=1000)


class ItemPrediction(BaseModel):
    item_id: int
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    model_version: int
    family: str
    items: list[ItemPrediction]


app = FastAPI(title="moestream ranking", version="0.1.0")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class RankerDeployment:
    def __init__(self, snapshot_dir: str, features: FeatureStoreConfig, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.weights = WeightFollower(Path(snapshot_dir))
        self.features = OnlineFeatures(features, apply=False)

    @app.get("/healthz")
    def healthz(self) -> dict:
        current = self.weights.current
        return {
            "ok": True,
            "model_version": current.version if current else None,
            "swaps": self.weights.swaps,
            "rejected_versions": sorted(self.weights.rejected),
            "pid": os.getpid(),
        }

    @app.post("/predict", response_model=PredictResponse)
    def predict(self, request: PredictRequest) -> PredictResponse:
        current = self.weights.current  # read once: a swap mid-request cannot mix two models
        if current is None:
            raise HTTPException(status_code=503, detail="no model snapshot has been published yet")
        items = np.asarray(request.item_ids, dtype=np.int64)
        users = np.full(len(items), request.user_id, dtype=np.int64)
        dense = torch.from_numpy(self.features.lookup(users, items))
        ids = {"user_id": torch.from_numpy(users), "item_id": torch.from_numpy(items)}
        with torch.inference_mode():
            probs = {t: p.tolist() for t, p in current.model.predict_proba(ids, dense).items()}
        return PredictResponse(
            model_version=current.version,
            family=current.manifest.data.get("family", "unknown"),
            items=[
                ItemPrediction(item_id=int(item), probabilities={t: v[i] for t, v in probs.items()})
                for i, item in enumerate(items)
            ],
        )


def build_app(snapshot_dir: Path, features: FeatureStoreConfig):
    return RankerDeployment.bind(str(Path(snapshot_dir).absolute()), features)
