"""`cluster-pipeline activations`: clusters of a layer's activations, their purity and images."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_e2e import cli

from cluster_pipeline.analysis.activations import (
    cluster_layer,
    nearest_to_centroid,
    purity_by_cluster,
    run_activations,
)
from cluster_pipeline.cli import main
from cluster_pipeline.config import ConfigError, load_config, to_yaml
from cluster_pipeline.data.augment import to_float
from cluster_pipeline.data.reader import SampleReader, ShardIndex
from cluster_pipeline.models.nets import build_model
from cluster_pipeline.run.images import PAD_PX, TILE_PX, tile_grid

CONFIG = "configs/digits_test.yaml"  # small_cnn width 8 on 8x8 digits


@pytest.fixture(scope="module")
def trained(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """small_cnn trained on the digits' true labels for a few seconds (a throwaway supervised
    loop): its layers carry the class. Saved as a plain state_dict and as a run checkpoint."""
    cfg = load_config(CONFIG, [f"data.shards={digits_shards}"])
    index = ShardIndex.load(digits_shards)
    images = SampleReader(index, cfg.data.load_size, 1).read_batch(np.arange(index.num_samples))
    x = to_float(torch.from_numpy(images), cfg.data.mean, cfg.data.std)
    y = torch.from_numpy(index.labels)
    torch.manual_seed(0)
    model = build_model(cfg.model, 1, 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        batch = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("supervised")
    torch.save(model.state_dict(), out / "plain.pt")
    torch.save({"model": model.state_dict(), "config": to_yaml(cfg)}, out / "run.pt")
    return {"plain": out / "plain.pt", "run": out / "run.pt"}


def analyse(shards: Path, run_dir: Path, weights: Path | None, layer: str) -> dict:
    cfg = load_config(CONFIG, [f"data.shards={shards}", f"run.dir={run_dir}", "cluster.k=10",
                               f"activations.layers=[{layer}]"])  # fmt: skip
    summaries = run_activations(cfg, str(weights) if weights else None)
    assert summaries is not None and [s["layer"] for s in summaries] == [layer]
    return json.loads((run_dir / "activations" / layer / "activations.json").read_text())


def test_a_class_carrying_layer_is_pure_and_a_random_early_layer_is_not(
    digits_shards: Path, trained: dict[str, Path], tmp_path: Path, dist_env: None
) -> None:
    good = analyse(digits_shards, tmp_path / "trained", trained["plain"], "fc")
    rand = analyse(digits_shards, tmp_path / "random", None, "block1")
    assert good["purity"] > 0.8 and good["nmi"] > 0.7, (good["purity"], good["nmi"])
    assert rand["purity"] < 0.5 and rand["nmi"] < 0.4, (rand["purity"], rand["nmi"])
    assert good["checkpoint"] == str(trained["plain"]) and rand["checkpoint"] == "random init"
    # Each cluster's purity and majority agree with the saved assignments and the true classes.
    labels = np.load(tmp_path / "trained" / "activations" / "fc" / "assignments.npy")
    truth = ShardIndex.load(digits_shards).labels
    for entry in good["clusters"]:
        members = truth[labels == entry["cluster"]]
        assert entry["size"] == len(members)
        counts = np.bincount(members, minlength=10)
        assert entry["majority"] == counts.argmax()
        assert entry["majority_class"] == str(counts.argmax())  # digits' class names
        assert entry["purity"] == pytest.approx(counts.max() / len(members))


def test_nearest_to_centroid_ranks_each_cluster_by_distance() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    labels[labels == 3] = 2  # cluster 3 empty
    sq = rng.random(200).astype(np.float32).round(2)  # many ties: broken by sample row
    rows = rng.permutation(1000)[:200]
    got = nearest_to_centroid(labels, sq, rows, k=4, m=7)
    assert len(got) == 4 and len(got[3]) == 0
    for c in range(3):
        members = np.flatnonzero(labels == c)
        want = sorted(members, key=lambda j: (sq[j], rows[j]))[:7]
        assert got[c].tolist() == want
        others = np.setdiff1d(members, got[c])
        assert sq[got[c]].max() <= sq[others].min()  # nothing left out is nearer


def test_purity_by_cluster_counts_the_majority() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    truth = np.array([5, 5, 1, 2, 3, 0])
    sizes, majority, purity = purity_by_cluster(labels, truth, 3)
    assert sizes.tolist() == [3, 2, 1] and majority.tolist() == [5, 2, 0]
    np.testing.assert_allclose(purity, [2 / 3, 0.5, 1.0])


def test_grid_tiles_are_the_images_in_rank_order() -> None:
    images = np.random.default_rng(1).integers(0, 255, (11, 8, 8, 1), dtype=np.uint8)
    grid = np.asarray(tile_grid(images, cols=4))
    t = TILE_PX  # 8 x 8 images are magnified 8 times
    assert grid.shape == (3 * (t + PAD_PX) + PAD_PX, 4 * (t + PAD_PX) + PAD_PX)
    for j in range(11):
        r, c = divmod(j, 4)
        top, left = PAD_PX + r * (t + PAD_PX), PAD_PX + c * (t + PAD_PX)
        tile = grid[top : top + t, left : left + t]
        assert np.array_equal(tile, np.kron(images[j, :, :, 0], np.ones((8, 8), np.uint8)))


def test_cluster_layer_distances_are_in_the_clustered_space(digits_shards: Path) -> None:
    cfg = load_config(CONFIG, [f"data.shards={digits_shards}", "cluster.k=5"])
    feats = np.random.default_rng(2).standard_normal((300, 6)).astype(np.float32)
    result = cluster_layer("x", feats, np.arange(300), cfg)
    assert result.pca_dim == 6  # cluster.pca_dim=16 capped at the layer's width
    assert np.bincount(result.labels, minlength=5).min() >= 1
    assert np.all(result.sq_dist <= 4.0 + 1e-5)  # L2-normalized points: |x - c|^2 <= 4


def run(tmp: Path, name: str, shards: Path, ckpt: Path, nproc: int, *extra: str):
    return cli("activations", *extra, "--checkpoint", str(ckpt), f"data.shards={shards}",
               f"run.dir={tmp / name}", "data.extract_batch_size=100", "activations.grid=3",
               nproc=nproc)  # fmt: skip


def test_two_ranks_write_every_output_and_equal_one_process(
    digits_shards: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    args = ("--layers", "block1,block3", "--k", "6")
    one = run(tmp_path, "one", digits_shards, trained["run"], 0, *args)
    two = run(tmp_path, "two", digits_shards, trained["run"], 2, *args)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    index = ShardIndex.load(digits_shards)
    reader = SampleReader(index, 8, 1)
    for layer in ("block1", "block3"):
        a, b = (tmp_path / n / "activations" / layer for n in ("one", "two"))
        ja, jb = (json.loads((d / "activations.json").read_text()) for d in (a, b))
        assert np.array_equal(np.load(a / "assignments.npy"), np.load(b / "assignments.npy"))
        assert ja["nmi"] == pytest.approx(jb["nmi"], abs=1e-9) and ja["k"] == 6
        assert ja["layer"] == layer and ja["ari"] is not None
        assert sum(c["size"] for c in jb["clusters"]) == 1797
        page = (b / "index.html").read_text()
        for entry in jb["clusters"]:
            shown = min(9, entry["size"])
            assert len(entry["nearest_rows"]) == shown
            assert entry["nearest_sq_dist"] == sorted(entry["nearest_sq_dist"])
            assert f'src="{entry["grid"]}"' in page
            with Image.open(b / entry["grid"]) as img:
                tiles = (3, math.ceil(shown / 3))
                assert img.size == tuple(n * (TILE_PX + PAD_PX) + PAD_PX for n in tiles)
                grid = np.asarray(img)
            rows = np.asarray(entry["nearest_rows"])
            want = np.asarray(tile_grid(reader.read_batch(rows), 3))
            assert np.array_equal(grid, want)  # the images read back by sample index
        assert (b / "index.png").is_file()
    table = json.loads((tmp_path / "two" / "activations" / "layers.json").read_text())
    assert [r["layer"] for r in table] == ["block1", "block3"]
    md = (tmp_path / "two" / "activations" / "layers.md").read_text().splitlines()
    assert len(md) == 2 + 2 and md[2].startswith("| block1 |")
    assert "| block1 |" in two.stdout and "| block3 |" in two.stdout
    # The run checkpoint carried its config; the run's own config.yaml is not touched.
    assert (tmp_path / "two" / "activations" / "config.yaml").is_file()
    assert not (tmp_path / "two" / "config.yaml").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--layer", "block7"), "'block7' is not a module of SmallCNN"),
        (("--layer", "fc", "--k", "5000"), "cluster.k=5000 but only 1797 samples"),
        (("--layer", "fc", "--pool", "mean"), "activations.pool='mean' is unknown"),
        (("--layer", "fc", "--random-init"), "give --checkpoint CKPT"),
        (
            (
                "--layers",
                "fc,",
            ),
            "activations.layers=['fc', ''] holds an empty name",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    digits_shards: Path,
    trained: dict[str, Path],
    tmp_path: Path,
    extra: tuple,
    message: str,
    capsys: pytest.CaptureFixture,
    dist_env: None,
) -> None:
    status = main(["activations", *extra, "--checkpoint", str(trained["run"]),
                   f"data.shards={digits_shards}", f"run.dir={tmp_path}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err


def test_random_init_needs_a_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["activations", "--layer", "fc", "--random-init"]) == 2
    assert "--random-init needs --config" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=re.escape("activations.grid=0 must be in 1..32")):
        load_config(CONFIG, ["activations.grid=0"])
