"""Where does a trained LearnPruner scorer look on easy-vqa? (docs/results/systems/README.md, "LearnPruner on
easy-vqa: what was checked".)

    python docs/results/systems/learnpruner_patches.py runs/compare-systems/16/learnpruner/train/model 60

Each easy-vqa image is one drawn shape on a plain background. For the first N distinct test images this prints the
share of the scorer's kept patches that touch the shape (any pixel of the patch differs from the background colour,
read at the top-left corner), the share of all patches that do (what random keeping would give), and the share of
the lowest-scored patches that do, then the kept-patch grid of the first image.
"""
import sys

import numpy as np
import torch
from PIL import Image

from compactvl.data.easyvqa import EasyVQA
from compactvl.model import CompactVLM
from compactvl.ops.learnpruner import LearnPruner
from compactvl.tokens import Tokens


def main(model_dir: str, n: int) -> None:
    model = CompactVLM.from_pretrained(model_dir).eval()
    op = next(o for o in model.token_ops.ops if isinstance(o, LearnPruner))
    ds = EasyVQA("test")
    paths = list(dict.fromkeys(path for _, _, _, path, _ in ds._rows))[:n]  # distinct images, in file order
    images = [Image.open(p).convert("RGB") for p in paths]
    enc = model.encoders[0]
    with torch.no_grad():
        out = enc(enc.preprocess(images), layers=model.taps[0])
        tokens = Tokens.from_encoder(out, model.layers[0], source=0)
        scores = op.scores(tokens, 0)
        kept = op.counts(tokens.kept_counts())
    side = int(round(scores.shape[1] ** 0.5))
    patch = enc.preprocess(images).shape[-1] // side
    top, everything, low = [], [], []
    for i, im in enumerate(images):
        a = np.asarray(im.resize((side * patch, side * patch), Image.NEAREST)).astype(int)
        shape = np.abs(a - a[0, 0]).sum(-1) > 30
        touches = shape.reshape(side, patch, side, patch).any((1, 3)).reshape(-1)
        k = int(kept[i])
        top.append(touches[scores[i].topk(k).indices.numpy()].mean())
        low.append(touches[(-scores[i]).topk(k).indices.numpy()].mean())
        everything.append(touches.mean())
    print(f"{len(images)} images, {int(kept[0])} of {scores.shape[1]} patches kept: share touching the shape: "
          f"kept {np.mean(top):.3f}, all patches {np.mean(everything):.3f}, lowest-scored {np.mean(low):.3f}")
    grid = np.zeros(scores.shape[1], int)
    grid[scores[0].topk(int(kept[0])).indices.numpy()] = 1
    print(grid.reshape(side, side))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 60)
