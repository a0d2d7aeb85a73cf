"""Publish a dataset under data/datasets/ to the Hugging Face Hub (side effects: not part of `dvc repro`).

    python -m stages.publish --dataset facesynthetics_spiga --repo-id user/name --dry-run
    python -m stages.publish --dataset facesynthetics_spiga --repo-id user/name [--revision main]
                             [--private | --public] [--create-pr] [--large]
    make publish ARGS="--repo-id user/name"

Defaults come from the `publish` section of params.yaml; flags override them. The exact tree to upload
(README.md card, data/{split}-NNNNN-of-NNNNN.parquet, sample_grid.png) is built in data/publish/<dataset>/
and checked (shard names, the card's splits, counts and features against the files) first; --dry-run
prints it and stops there. Then, before any upload work: a token (HF_TOKEN or `hf auth login`), the Hub
reachable at HF_ENDPOINT, the token allowed to write, the repo existing or creatable. After the upload the
Hub commit id goes to reports/publish/<dataset>.json: `load_dataset(repo_id, revision=<commit_id>)` loads
exactly what was published. An interrupted upload resumes by running the same command again.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from pipelines.digests import sha256_file
from pipelines.publish import PublishError, StagedFile, check_repo_id, format_tree, publish
from pipelines.reports import read_report, write_json
from stages import config as C

# the params keys this stage reads (dvc.yaml lists the same: tests/test_dvc_deps.py)
PARAMS = ("publish",)

log = logging.getLogger(__name__)

DATASETS_DIR = Path("data/datasets")
DATASET_REPORTS = Path("reports/datasets")
STAGING_DIR = Path("data/publish")
REPORTS_DIR = Path("reports/publish")


@dataclasses.dataclass(frozen=True)
class PublishConfig:
    """The ``publish`` section of params.yaml (every key may be overridden by a flag)."""

    dataset: str  # a folder under data/datasets/
    repo_id: str | None  # namespace/name on the Hub; null: --repo-id is required
    revision: str  # branch to commit to (created when missing); 'main' with create_pr
    private: bool  # visibility when the repo is created (an existing repo keeps its own)
    create_pr: bool  # open a pull request instead of committing to the branch
    large_threshold_bytes: int  # above this total, use upload_large_folder where the client has it

    def validate(self, prefix: str) -> None:
        """Raise :class:`stages.config.ParamError` naming the first bad value."""
        if not self.dataset or "/" in self.dataset or self.dataset.startswith("."):
            raise C.ParamError(f"{prefix}.dataset: {self.dataset!r} is not a folder name under {DATASETS_DIR}")
        if not self.revision:
            raise C.ParamError(f"{prefix}.revision: must be a branch name, got {self.revision!r}")
        C.positive(prefix, large_threshold_bytes=self.large_threshold_bytes)
        if self.repo_id is not None:
            try:
                check_repo_id(self.repo_id)
            except PublishError as exc:
                raise C.ParamError(f"{prefix}.repo_id: {exc}") from None
        if self.create_pr and self.revision != "main":
            raise C.ParamError(f"{prefix}.create_pr: a pull request targets the default branch; "
                               f"revision must be 'main', got {self.revision!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: the common ``--params``/``--profile`` plus flags overriding the ``publish`` section."""
    p = argparse.ArgumentParser(prog="python -m stages.publish", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=C.PARAMS_FILE, help="params file (default: %(default)s)")
    p.add_argument("--profile", choices=C.PROFILES, default=None, help="override base.profile for this run")
    p.add_argument("--dataset", help=f"folder under {DATASETS_DIR}/ (default: publish.dataset)")
    p.add_argument("--repo-id", help="namespace/name of the dataset repo (default: publish.repo_id)")
    p.add_argument("--revision", help="branch to commit to (default: publish.revision)")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=None,
                     help="create the repo private (default: publish.private)")
    vis.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    p.add_argument("--create-pr", action="store_true", default=None, help="open a pull request (default: publish.create_pr)")
    p.add_argument("--large", action="store_true", default=None,
                   help="force upload_large_folder where available (default: when the set exceeds "
                        "publish.large_threshold_bytes)")
    p.add_argument("--dry-run", action="store_true", help="build and print the tree to upload; no Hub call")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN, then `hf auth login`)")
    return p.parse_args(argv)


def merge(cfg: PublishConfig, args: argparse.Namespace) -> PublishConfig:
    """``cfg`` with the flags given on the command line, re-validated."""
    over = {k: v for k, v in {"dataset": args.dataset, "repo_id": args.repo_id, "revision": args.revision,
                              "private": args.private, "create_pr": args.create_pr}.items() if v is not None}
    return C.parse(PublishConfig, {**dataclasses.asdict(cfg), **over}, "publish")


def run_publish(cfg: PublishConfig, *, dry_run: bool = False, large: bool | None = None, token: str | None = None,
                datasets_dir: Path = DATASETS_DIR, dataset_reports: Path = DATASET_REPORTS,
                staging_root: Path = STAGING_DIR, reports_dir: Path = REPORTS_DIR, api=None) -> dict:
    """Publish ``cfg.dataset``; write reports/publish/<dataset>.json after a successful upload; return it
    (the dry run returns the staged tree and writes no report)."""
    if cfg.repo_id is None:
        raise C.ParamError("publish.repo_id is null: pass --repo-id namespace/name or set it in params.yaml")
    dataset_dir = datasets_dir / cfg.dataset
    if not dataset_dir.is_dir():
        have = sorted(p.name for p in datasets_dir.iterdir() if p.is_dir()) if datasets_dir.is_dir() else []
        raise FileNotFoundError(f"{dataset_dir} not found (have: {', '.join(have) or 'none'}); run its assemble "
                                f"stage first (dvc repro)")
    report_path = dataset_reports / f"{cfg.dataset}.json"
    dataset_report = read_report(report_path) if report_path.is_file() else {}  # + its .provenance.json
    if large is None:
        total = sum(p.stat().st_size for p in dataset_dir.rglob("*") if p.is_file())
        large = total > cfg.large_threshold_bytes
    result = publish(dataset_dir, cfg.repo_id, cfg.revision, cfg.private, cfg.create_pr, token, dry_run, large,
                     staging_dir=staging_root / cfg.dataset, report=dataset_report, api=api)
    if dry_run:
        return result
    out = {
        "dataset": cfg.dataset,
        "dataset_dir": str(dataset_dir),
        "dataset_report": str(report_path) if dataset_report else None,
        "dataset_report_sha256": sha256_file(report_path) if report_path.is_file() else None,
        "repo_id": result["repo_id"],
        "repo_type": "dataset",
        "revision": result["revision"],
        "commit_id": result["commit_id"],
        "commit_url": result["commit_url"],
        "pr_url": result["pr_url"],
        "private_when_created": result["private"],
        "method": result["method"],
        "endpoint": result["preflight"]["endpoint"],
        "files": result["files"],
        "bytes": result["bytes"],
        "card_sha256": result["card_sha256"],
        "load": f'datasets.load_dataset("{result["repo_id"]}", revision="{result["commit_id"]}")',
        "uses_standin_models": dataset_report.get("uses_standin_models"),
        "uses_embedded_sample": dataset_report.get("uses_embedded_sample"),
    }
    write_json(reports_dir / f"{cfg.dataset}.json", out)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the command (``argv``: the command line, for tests)."""
    args = parse_args(argv)
    _, cfg = C.load(PublishConfig, "publish", C.read_params(args.params, PARAMS), args.profile)
    cfg = merge(cfg, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = run_publish(cfg, dry_run=args.dry_run, large=args.large, token=args.token)
    if args.dry_run:
        tree = [StagedFile(f["path"], f["size"]) for f in result["files"]]
        print(f"dry run: would upload {result['staging_dir']} to datasets/{result['repo_id']}@{result['revision']}"
              f"{' as a pull request' if result['create_pr'] else ''}:")
        print(format_tree(tree))
    else:
        log.info("published %s to %s at %s (commit %s)%s; wrote %s", cfg.dataset, result["repo_id"],
                 result["revision"], result["commit_id"], f", PR {result['pr_url']}" if result["pr_url"] else "",
                 REPORTS_DIR / f"{cfg.dataset}.json")
    return result


if __name__ == "__main__":
    C.run(main)
