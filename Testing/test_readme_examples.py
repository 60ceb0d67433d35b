"""Every command example of the README and of its docs/ pages runs, so that none can silently break again.

The ```bash blocks (and inline `oflsam2 ...` commands) are parsed from README.md and docs/*.md and run
in-process through ``oflsam2.cli.main`` in a folder that holds small crops of real volumes
under the README's own file names (``ct.nii.gz``, ``case01.nii.gz``, ``adapters/liver``...).
Model commands get ``--random-weights --image-size 256`` and one training epoch, and use
SAM2.1-tiny (the session's random-weight model is shared); the experiment file is the real
``chaos_shared.yaml`` cut down to one query of a few slices. Commands that need the network, a
package that is not installed (Ray, nilearn) or that install or run the suite itself are
listed and skipped with the reason.

Also here: support from other volumes alone runs for every method that can use it (12.2).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from oflsam2 import backend, cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOC_PAGES = sorted((REPO / "docs").glob("*.md"))  # the pages the README links to for details
CHAOS_Z = slice(15, 18)  # 3 axial slices that hold the liver in every CHAOS case
CT_Z = slice(88, 93)  # 5 slices of the TotalSegmentator CT with spleen (1) and left kidney (3)
MODEL_COMMANDS = {"segment", "train", "demo", "batch"}


def readme_commands(text: str) -> list[str]:
    """Shell commands of the README's ```bash blocks (continuations joined, comments and
    ``&&`` chains split) and of inline code that starts with ``oflsam2 ``."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            commands += [" ".join(part.split()) for part in line.split("&&") if part.strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [c for c in re.findall(r"`(oflsam2 [^`]+)`", prose) if not re.search(r"[A-Z]{3,}", c)]
    return commands


def documented_commands() -> list[str]:
    """The commands of the README, then those of its docs/ pages, in reading order."""
    return [command for page in (README, *DOC_PAGES) for command in readme_commands(page.read_text())]


def why_skipped(command: str) -> str | None:
    words = shlex.split(command)
    if words[0] == "bash" and words[1] == "scripts/setup.sh":
        return "installs the environment"
    if "pytest" in words:
        return "runs the test suite itself"
    if Path(words[0]).name != "oflsam2":
        return f"not an oflsam2 command ({words[0]})"
    if "..." in words or any(re.fullmatch(r"[A-Z_]+(:\d+)?", w) for w in words):
        return "a pattern with placeholders, not a command"
    if words[1] == "serve":
        return "starts a server that runs until stopped; Testing/test_server_cli.py starts real ones (arguments checked)"
    if "--server" in words:
        return "needs a running server; Testing/test_server_cli.py runs such commands against one (arguments checked)"
    if words[1:3] == ["checkpoints", "download"]:
        return "downloads from the network (arguments checked)"
    if "ray" in words and importlib.util.find_spec("ray") is None:
        return "needs Ray, which is not installed (arguments checked)"
    if words[1] == "demo" and importlib.util.find_spec("nilearn") is None:
        return "needs nilearn, which is not installed (arguments checked)"
    return None


def runnable(command: str) -> list[str]:
    """The command's arguments with the test settings added: random-weight SAM2.1-tiny at 256 px,
    one training epoch."""
    words = shlex.split(command)[1:]
    if "--model" in words:
        words[words.index("--model") + 1] = "sam2.1-tiny"
    if words[0] == "experiment" and "--random-weights" not in words:
        words.append("--random-weights")
    if words[0] in MODEL_COMMANDS:
        words += ["--random-weights", "--image-size", "256"] + ([] if "--model" in words else ["--model", "sam2.1-tiny"])
        if words[0] in ("train", "demo") or "ofl" in words:
            words += ["--epochs", "1"]
    return words


# ---------------------------------------------------------------------------------------------
# The README's files, as small real crops


def save(image: sitk.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def chaos(shared_data, case: int) -> tuple[sitk.Image, sitk.Image]:
    folder = shared_data / "chaos_t2_fewshot"
    image = sitk.Cast(sitk.ReadImage(str(folder / f"image_{case}.nii.gz"))[:, :, CHAOS_Z], sitk.sitkFloat32)
    labels = sitk.ReadImage(str(folder / f"label_{case}.nii.gz"))[:, :, CHAOS_Z]
    return image, sitk.Cast(sitk.Round(labels), sitk.sitkUInt8)


def sparse(labels: sitk.Image, keep: tuple[int, ...]) -> sitk.Image:
    """The label map kept on the planes ``keep`` only: what a user annotates."""
    array = sitk.GetArrayFromImage(labels)
    kept = np.zeros_like(array)
    kept[list(keep)] = array[list(keep)]
    result = sitk.GetImageFromArray(kept)
    result.CopyInformation(labels)
    return result


@pytest.fixture(scope="module")
def workspace(shared_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    ct_folder = shared_data / "totalsegmentator_ct_mr"
    save(sitk.ReadImage(str(ct_folder / "example_ct.nii.gz"))[:, :, CT_Z], root / "ct.nii.gz")
    ct_labels = sitk.ReadImage(str(ct_folder / "example_seg_fast_force_split.nii.gz"))[:, :, CT_Z]
    save(sparse(ct_labels, (1, 3)), root / "labels.nii.gz")
    save(ct_labels, root / "ct_truth.nii.gz")
    for case, name in ((1, "case01"), (2, "case02"), (5, "q"), (3, "a"), (8, "b")):
        image, labels = chaos(shared_data, case)
        save(image, root / f"{name}.nii.gz")
        save(labels if name in ("a", "b") else sparse(labels, (0, 2)), root / f"{name}_labels.nii.gz")
    for case in (3, 8):  # eval: predictions and references matched by case name
        _, labels = chaos(shared_data, case)
        save(labels, root / "references" / f"case{case}.nii.gz")
        save(sitk.BinaryDilate(labels == 1, [1, 1, 0]), root / "predictions" / f"case{case}.nii.gz")
    for case in (10,):  # batch: scans/NAME.nii.gz with supports/NAME.nii.gz
        image, labels = chaos(shared_data, case)
        save(image, root / "scans" / f"image_{case}.nii.gz")
        save(sparse(labels, (0, 2)), root / "supports" / f"image_{case}.nii.gz")
    _small_experiment(shared_data, root)
    return root


def _small_experiment(shared_data, root: Path) -> None:
    """Resources/experiments/chaos_shared.yaml with its data cut to a few slices of 3 cases."""
    config = yaml.safe_load((REPO / "Resources" / "experiments" / "chaos_shared.yaml").read_text())
    data = root / "chaos_small"
    for case in (1, 2, 3):
        image, labels = chaos(shared_data, case)
        save(image, data / f"image_{case}.nii.gz")
        save(labels, data / f"label_{case}.nii.gz")
    config.update(data_root=str(data), labels={1: "liver"}, queries=[3])
    config["cases"]["ids"] = [1, 2, 3]
    config["support"].update(volumes=[1, 2], slices_per_label=1)
    for method in config["methods"]:
        if method["method"] == "ofl":
            method["options"].update(epochs=1, lr_milestones=[1])
    path = root / "Resources" / "experiments" / "chaos_shared.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))


def corrected_result(root: Path) -> None:
    """v1_fixed.nii.gz: v1.nii.gz with one unannotated slice redrawn, as the review section's
    step 2 asks the user to do (here: the reference labels 1 and 3 of that slice)."""
    v1 = sitk.ReadImage(str(root / "v1.nii.gz"))
    fixed = sitk.GetArrayFromImage(v1)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "ct_truth.nii.gz")))
    fixed[2] = np.where(np.isin(truth[2], (1, 3)), truth[2], 0)
    corrected = sitk.GetImageFromArray(fixed)
    corrected.CopyInformation(v1)
    sitk.WriteImage(corrected, str(root / "v1_fixed.nii.gz"))


# Files the README's commands use that an earlier command's output is made into by hand.
MADE_BY_HAND = {"v1_fixed.nii.gz": corrected_result}


@pytest.fixture
def shared_model(monkeypatch, tiny_model):
    """Runs that ask for random-weight SAM2.1-tiny at 256 px reuse the session's model."""
    real = backend.load_sam2

    def load(settings):
        if settings.random_weights and settings.model == "sam2.1-tiny" and settings.image_size == 256:
            return tiny_model
        return real(settings)

    monkeypatch.setattr(backend, "load_sam2", load)


# ---------------------------------------------------------------------------------------------


def test_the_readme_examples_are_found():
    commands = readme_commands(README.read_text())
    found = {shlex.split(c)[1] for c in commands if Path(shlex.split(c)[0]).name == "oflsam2"}
    assert {"segment", "train", "eval", "experiment", "checkpoints", "demo"} <= found, commands


def test_every_readme_command_runs(workspace, shared_model, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("OFLSAM2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("OFLSAM2_CHECKPOINT", raising=False)
    ran, skipped, failed = [], [], []
    for command in documented_commands():
        reason = why_skipped(command)
        if reason is not None:
            if "arguments checked" in reason:
                cli.build_parser().parse_args(shlex.split(command)[1:])  # a usage error would exit
            skipped.append(f"{command}  ({reason})")
            continue
        for name, make in MADE_BY_HAND.items():
            if name in command and not (workspace / name).exists():
                make(workspace)
        started = time.perf_counter()
        status = cli.main(runnable(command))
        output = capsys.readouterr()
        (ran if status == 0 else failed).append(f"{command}  ({time.perf_counter() - started:.0f} s)")
        if status != 0:
            failed[-1] += f"\n  exit {status}: {output.err.strip()[-600:]}"
    print("ran:", *ran, "skipped:", *skipped, sep="\n  ")
    assert not failed, "README examples that fail:\n" + "\n".join(failed)
    assert len(ran) >= 7
    # What the examples promise, checked on their outputs
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(workspace / "result.nii.gz")))
    support = sitk.GetArrayFromImage(sitk.ReadImage(str(workspace / "labels.nii.gz")))
    assert set(np.unique(result)) <= {0, 1, 3}
    for z in (1, 3):  # annotated slices come out as drawn (labels 1 and 3 of the run)
        np.testing.assert_array_equal(result[z], np.where(np.isin(support[z], (1, 3)), support[z], 0))
    assert (workspace / "result.seg.nrrd").is_file() and (workspace / "case02_liver.nii.gz").is_file()
    assert (workspace / "q_seg.nii.gz").is_file() and (workspace / "results.csv").is_file()
    adapter = yaml.safe_load((workspace / "adapters" / "liver" / "label_1.json").read_text())
    assert adapter["preset"] == "mr" and adapter["intensity"]["modality"] == "mr"  # 12.14: resolved, not "auto"


@pytest.mark.parametrize("method", ["forward", "ofl"])
def test_support_from_other_volumes_alone(workspace, shared_model, method, capsys, tmp_path):
    """12.2: nothing annotated in the query; the README example covers revsam2."""
    out = tmp_path / f"{method}.nii.gz"
    argv = ["segment", "--image", str(workspace / "q.nii.gz"), "--out", str(out), "--method", method,
            "--reference", f"{workspace / 'a.nii.gz'}:{workspace / 'a_labels.nii.gz'}", "--labels", "1",
            "--random-weights", "--image-size", "256", "--epochs", "1", "--json"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(workspace / "q.nii.gz")).GetSize()


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_and_docs_links_resolve():
    """Every relative link of the README, its docs/ pages and the benchmarks page names a file
    that exists and, with a #fragment, a heading of that file: moved text leaves no dead link."""
    pages = [README, *DOC_PAGES, REPO / "benchmarks" / "README.md"]
    assert {page.name for page in DOC_PAGES} >= {"reference.md", "methods.md", "internals.md"}
    dead = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # an external address
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (fragment and fragment not in anchors(linked)):
                dead.append(f"{page.relative_to(REPO)}: {target}")
    assert not dead, dead


def test_readme_parser_sees_continuations_chains_and_inline_commands():
    text = "```bash\n# a comment\nbash x.sh --a && oflsam2 demo\noflsam2 segment --image a \\\n    --out b  # note\n```\n" \
           "Run `oflsam2 checkpoints list` or `oflsam2 checkpoints download NAME`."
    assert readme_commands(text) == ["bash x.sh --a", "oflsam2 demo", "oflsam2 segment --image a --out b",
                                     "oflsam2 checkpoints list"]
