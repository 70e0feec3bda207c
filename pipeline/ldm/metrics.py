"""Standard metrics of generated images: FID, KID, precision/recall, CLIP score.

Features: the FID Inception-v3 (the TensorFlow 2015-12-05 graph ported to PyTorch) of
**torch-fidelity** (``FeatureExtractorInceptionV3``, 2048-d pool features, its TF1-compatible
bilinear resize to 299 px). torch-fidelity is the reference behind torchmetrics' FID/KID and the
only one of the three usual libraries that also ships precision/recall and reads the weights from
a local file; the metric arithmetic is torch-fidelity's too (``fid_statistics_to_metric``,
``kid_features_to_metric``, ``prc_features_to_metric`` = Kynkäänniemi et al. 2019, k = 3).
No weights are downloaded: :func:`load_inception` reads a local file, weights-only.

CLIP score (Hessel et al. 2021, as torchmetrics defines it): ``100 * max(cos(image, text), 0)``
averaged, with a local Hugging Face CLIP folder (``transformers.CLIPModel``, no hub access).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_FILE)
FEATURE = "2048"


def missing_inception_message() -> str:
    """What to download for ``--inception-weights`` (the error when none is given)."""
    return (f"FID, KID and precision/recall need the FID Inception-v3 weights: download "
            f"{INCEPTION_FILE} (torch-fidelity's port of TensorFlow's 2015-12-05 graph, 91 MB, "
            f"sha256 prefix 6726825d) from {INCEPTION_URL} and pass --inception-weights PATH")


def load_inception(path: str) -> torch.nn.Module:
    """torch-fidelity's FID Inception-v3 with the weights of a local file (``.pth`` read
    weights-only, or ``.safetensors``); a FileNotFoundError naming the file it needs."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from dataengine.models.checkpoint import read_local_state_dict

    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"--inception-weights {path!r} is not a file. "
                                f"{missing_inception_message()}")
    state = read_local_state_dict(path)  # weights-only: refuses pickled code
    # torch-fidelity's constructor reads its file with weights_only=False: hand it a file of the
    # tensors just validated, never the user's file
    with tempfile.TemporaryDirectory() as tmp:
        safe = os.path.join(tmp, "inception.pth")
        torch.save(state, safe)
        try:
            return FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE],
                                               feature_extractor_weights_path=safe)
        except RuntimeError as exc:
            raise ValueError(f"{path}: not the FID Inception-v3 weights ({str(exc)[:300]}). "
                             f"{missing_inception_message()}") from exc


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: np.ndarray | torch.Tensor,
                       batch_size: int = 16) -> torch.Tensor:
    """``NxHxWx3`` uint8 images -> ``Nx2048`` float64 pool features."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be NxHxWx3 uint8, got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2).contiguous()
    out = [model(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)]
    return torch.cat(out).double()


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between two ``NxD`` feature sets."""
    from torch_fidelity.metric_fid import (KEY_METRIC_FID, fid_features_to_statistics,
                                           fid_statistics_to_metric)

    return float(fid_statistics_to_metric(fid_features_to_statistics(real),
                                          fid_features_to_statistics(fake),
                                          False)[KEY_METRIC_FID])


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100,
        subset_size: int = 1000) -> tuple[float, float]:
    """Kernel (polynomial, degree 3) distance: (mean, std) over random subsets."""
    from torch_fidelity.metric_kid import (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                                           kid_features_to_metric)

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(real)}, {len(fake)}")
    out = kid_features_to_metric(fake, real, kid_subsets=subsets, kid_subset_size=size,
                                 verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.): the share of generated samples in
    the real manifold (k-NN balls) and of real samples in the generated one."""
    from torch_fidelity.metric_prc import (KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                           prc_features_to_metric)

    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    out = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=k,
                                 prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, *, k: int = 3
                         ) -> dict[str, float]:
    """FID, KID (mean, std), precision, recall of ``fake`` against ``real`` features."""
    kid_mean, kid_std = kid(real, fake)
    precision, recall = precision_recall(real, fake, k)
    return {"fid": fid(real, fake), "kid": kid_mean, "kid_std": kid_std,
            "precision": precision, "recall": recall}


# ---- CLIP score ---------------------------------------------------------------------------------

def load_clip(path: str) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from a local Hugging Face folder (never the hub)."""
    from transformers import CLIPModel, CLIPProcessor

    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"--clip-model {path!r} is not a folder: give a local Hugging "
                                f"Face CLIP folder (config.json, model weights, tokenizer and "
                                f"preprocessor files, e.g. openai/clip-vit-base-patch32 saved "
                                f"with save_pretrained)")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    return model, CLIPProcessor.from_pretrained(path, local_files_only=True)


def _projected(out: Any) -> torch.Tensor:
    """The projected embedding: transformers 5 returns it as the output's ``pooler_output``."""
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def clip_score(model: Any, processor: Any, images: np.ndarray, texts: Sequence[str],
               batch_size: int = 16) -> float:
    """Mean of ``100 * max(cos(image embedding, text embedding), 0)`` over image/text pairs."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    scores = []
    for i in range(0, len(texts), batch_size):
        inp = processor(text=list(texts[i:i + batch_size]), images=list(images[i:i + batch_size]),
                        return_tensors="pt", padding=True, truncation=True)
        img = _projected(model.get_image_features(pixel_values=inp["pixel_values"]))
        txt = _projected(model.get_text_features(input_ids=inp["input_ids"],
                                                 attention_mask=inp["attention_mask"]))
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        scores.append((100.0 * (img * txt).sum(-1)).clamp(min=0))
    return float(torch.cat(scores).mean())
