#!/usr/bin/env python
"""Measure class-conditional accuracy of the zoo models with the digit classifier.

The classifiers themselves live in ``ditopt/zoo/classifier.py`` (sklearn SVCs
fitted at first use on sklearn's digits).  This tool:

* ``--check``: cross-validated accuracy of the classifiers on real data
  (held-out digits; for the video classifier, digits pasted at random
  positions on the 16x16 canvas),
* for each ``--model``: samples ``--per-class`` samples for each digit with
  full compute (no caching) at the given steps / guidance, classifies them
  (per frame for video) and prints accuracy and sampling time per generation.

Example::

    python tools/digit_classifier.py --check
    python tools/digit_classifier.py --model dit-digits --per-class 10
    python tools/digit_classifier.py --model wan-digits --per-class 10 --batch 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def check_classifiers() -> None:
    from sklearn.model_selection import train_test_split

    from ditopt.zoo import classifier as C
    from ditopt.zoo import digits as D

    x16, y = D.digits_16()
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.3, random_state=0, stratify=y.numpy())
    clf = C._svc().fit(C._image_features(x16[idx_tr]), y.numpy()[idx_tr])
    acc = (clf.predict(C._image_features(x16[idx_te])) == y.numpy()[idx_te]).mean()
    print(f"image classifier, held-out real digits (30%): {acc:.3f}")

    size = D.VIDEO_DIGIT
    xs, _ = D.digits_sized(size)
    g = torch.Generator().manual_seed(99)
    pos = torch.rand(len(y), 2, generator=g) * (D.CANVAS - size)
    crops = C._recentre(D.place(xs, pos) * 2 - 1, size).reshape(len(y), -1).numpy() * 16
    plain = F.adaptive_avg_pool2d(xs, (8, 8)).reshape(len(y), -1).numpy() * 16
    feats_tr = np.concatenate([plain[idx_tr], crops[idx_tr]])
    clf = C._svc().fit(feats_tr, np.concatenate([y.numpy()[idx_tr]] * 2))
    acc = (clf.predict(crops[idx_te]) == y.numpy()[idx_te]).mean()
    print(f"video classifier ({size}x{size} digits), held-out real digits at random canvas positions: {acc:.3f}")
    # real training-style clips, with the shipped classifier
    frames = torch.stack([D.place(xs[:200], pos[:200] * a) * 2 - 1 for a in (0.0, 0.5, 1.0)], dim=2)
    acc = (C.classify(frames) == y.numpy()[:200, None]).mean()
    print(f"shipped video classifier on real clips (sanity): {acc:.3f}")


def evaluate(name: str, per_class: int, batch: int, steps, guidance, seed: int) -> None:
    from ditopt import zoo

    t0 = time.time()
    m = zoo.load(name)
    print(f"{name}: loaded in {time.time() - t0:.2f}s, steps={steps or m.steps}, guidance={guidance or m.guidance_scale}")
    labels = torch.arange(10).repeat_interleave(per_class)
    preds, times = [], []
    for i in range(0, len(labels), batch):
        lab = labels[i : i + batch]
        t0 = time.time()
        x = m.sample(lab, seed=seed + i, steps=steps, guidance_scale=guidance)
        times.append(time.time() - t0)
        preds.append(m.classify(x))
    p = np.concatenate(preds)
    y = labels.numpy()
    if p.ndim == 2:
        y = y[:, None]
        clip_maj = np.array([np.bincount(r, minlength=10).argmax() for r in p])
        print(f"  clip accuracy (majority over frames): {(clip_maj == labels.numpy()).mean():.3f}")
    acc = (p == y).mean()
    per = [(p[labels.numpy() == c] == c).mean() for c in range(10)]
    print(f"  accuracy: {acc:.3f}  ({'per frame, all frames' if p.ndim == 2 else 'per image'}; n={p.size})")
    print("  per class: " + " ".join(f"{c}:{a:.2f}" for c, a in enumerate(per)))
    print(f"  sampling time: {np.mean(times):.2f}s per generation of batch {batch} "
          f"({np.sum(times) / len(labels) * 1000:.0f} ms per sample)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.check:
        check_classifiers()
    for name in a.model:
        evaluate(name, a.per_class, a.batch, a.steps, a.guidance, a.seed)


if __name__ == "__main__":
    main()
