"""Prediction on a Dask cluster: one huge image or volume block by block, labels stitched across blocks, or a
folder file by file (`unetseg-predict IN OUT --dask ADDRESS`). Needs pip install 'unetseg[distributed]';
nothing else in unetseg imports this package, so the default install never imports dask.

    from unetseg.distributed import predict_on_cluster
    from unetseg.inference.pipeline import PredictSettings

    settings = PredictSettings(output=("labels", "prob"), format="ome-zarr")
    predict_on_cluster("local:4", "model.ckpt", "big.ome.zarr", "out/", settings)
"""

from unetseg.distributed.blocks import BlockReport, predict_blocks
from unetseg.distributed.cluster import connect
from unetseg.distributed.files import predict_files_on_cluster
from unetseg.distributed.model import ClusterModel, use_model
from unetseg.distributed.run import predict_on_cluster

__all__ = [
    "BlockReport",
    "ClusterModel",
    "connect",
    "predict_blocks",
    "predict_files_on_cluster",
    "predict_on_cluster",
    "use_model",
]
