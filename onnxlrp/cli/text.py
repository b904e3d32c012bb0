"""``onnxlrp explain MODEL --text "..." --tokenizer tokenizer.json``: explain a language model on text.

Each line is tokenized with the `tokenizers` package from a local tokenizer.json (no hub access), the
token ids are explained (relevance summed over the embedding features per token), the coloured tokens
are printed and one HTML page with every line is written into --out. Lines of equal token length share
a batch: no padding, so the model sees each line exactly as it would alone.
"""
from __future__ import annotations

import html
import json
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import click
import numpy as np

from .app import CLIError

HTML_NAME = "text_heatmap.html"


@dataclass
class TextSample:
    line: int
    text: str
    tokens: list
    ids: list


def read_lines(text, text_file):
    """(line number, text) of every non-empty input line."""
    lines = []
    if text is not None:
        lines.extend(t for t in text)
    if text_file is not None:
        try:
            with open(text_file, encoding="utf-8") as f:
                lines.extend(line.rstrip("\n") for line in f)
        except OSError as exc:
            raise CLIError(f"{text_file}: cannot read the text file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CLIError(f"{text_file}: the text file is not UTF-8 text") from None
    found = [(i + 1, t) for i, t in enumerate(lines) if t.strip()]
    if not found:
        raise CLIError("no text to explain: --text and --text-file gave only empty lines")
    return found


def load_tokenizer(path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CLIError("--text needs the 'tokenizers' package: pip install tokenizers "
                       "(or pip install 'onnxlrp[text]')") from None
    if not os.path.isfile(path):
        raise CLIError(f"--tokenizer {path}: no such file")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CLIError(f"--tokenizer {path}: not a tokenizer.json file ({first})") from None


def tokenize(tokenizer, lines, vocab_size, tokenizer_path, model):
    samples = []
    for number, text in lines:
        enc = tokenizer.encode(text)
        if not enc.ids:
            raise CLIError(f"line {number}: the tokenizer gives no tokens for {text!r}")
        too_big = [i for i in enc.ids if i >= vocab_size]
        if too_big:
            raise CLIError(f"line {number}: token id {too_big[0]} from {tokenizer_path} is out of range for "
                           f"{model}, whose embedding table has {vocab_size} rows: tokenizer and model do not match")
        samples.append(TextSample(number, text, list(enc.tokens), list(enc.ids)))
    return samples


def _clean(token):
    """WordPiece continuation marks and byte-level BPE spaces, as a person reads them."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n")


def explain_text(analyzer, model, lines, tokenizer_path, output_selection, labels, out, force, as_json,
                 batch_size, progress, quiet, desc, hm_kwargs):
    from ..files import atomic_write
    from ..heatmaps import text_heatmap
    from .explain import Progress, prepare_out_dir, remove_dirs
    if not analyzer.token_input:
        raise CLIError(f"{model}: --text explains models whose input is token ids; this model's input "
                       f"'{analyzer.data_input}' is {analyzer.input_dtype} (give images or .npy arrays)")
    tokenizer = load_tokenizer(tokenizer_path)
    samples = tokenize(tokenizer, lines, analyzer.vocab_size, tokenizer_path, model)
    target = os.path.join(out, HTML_NAME)

    created = prepare_out_dir(out, [SimpleNamespace(outputs={"html": target})], force)

    by_length = {}
    for s in samples:
        by_length.setdefault(len(s.ids), []).append(s)
    rows = {}
    bar = Progress(len(samples), False if quiet else (progress if progress is not None
                                                      else (None if len(samples) > 1 else False)), "explaining")
    try:
        for length, group in by_length.items():
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                ids = np.asarray([s.ids for s in batch], dtype=np.int64)
                expl = analyzer.analyze(ids, output_selection)
                rows.update(_rows(batch, expl, analyzer, labels, tokenizer))
                bar.update(len(batch))
    except BaseException:
        remove_dirs(created)
        raise
    finally:
        bar.close()
    ordered = [rows[s.line] for s in samples]
    sections = []
    for s, row in zip(samples, ordered):
        th = text_heatmap([_clean(t) for t in s.tokens], np.asarray(row["token_relevance"]), **hm_kwargs)
        row["heatmap"] = th
        sections.append(f"<h3>line {s.line}: {html.escape(_describe(row))}</h3>\n{th.html()}")
    with atomic_write(target, "w", encoding="utf-8") as f:
        f.write(_page(model, desc, sections))
    if as_json:
        results = [{k: v for k, v in row.items() if k != "heatmap"} for row in ordered]
        click.echo(json.dumps({"model": model, "rules": desc, "device": analyzer.execution_device,
                               "html": target, "results": results}, indent=2))
    else:
        color = sys.stdout.isatty()
        for row in ordered:
            click.echo(f"line {row['line']}: {_describe(row)}")
            click.echo(str(row["heatmap"]) if color else " ".join(
                f"{tok}({r:+.3g})" for tok, r in zip(row["tokens"], row["token_relevance"])))
    if not quiet:
        click.echo(f"onnxlrp: {desc} on {analyzer.execution_device}; wrote {target}", err=True)


def _rows(batch, expl, analyzer, labels, tokenizer):
    from .explain import _label
    out = np.asarray(expl.output)
    token_rel = np.asarray(expl.extras["token_relevance"])
    rows = {}
    for i, s in enumerate(batch):
        sel = int(expl.output_selection[i])
        if analyzer.sequence_output:
            pos = int(expl.extras["output_position"][i])
            logits = out[i, pos].reshape(-1)
            explained = {"position": pos, "explained_token": tokenizer.id_to_token(sel)}
        else:
            logits = out[i].reshape(-1)
            explained = {}
        pred = int(np.argmax(logits))
        rows[s.line] = {
            "line": s.line, "text": s.text, "tokens": [_clean(t) for t in s.tokens], "ids": s.ids,
            "predicted": pred, "predicted_label": _label(labels, pred), "score": float(logits[pred]),
            "explained": sel, "explained_label": _label(labels, sel), "explained_score": float(logits[sel]),
            **explained,
            "relevance_sum": float(token_rel[i].sum(dtype=np.float64)),
            "token_relevance": [float(v) for v in token_rel[i]],
        }
    return rows


def _describe(row):
    label = f" ({row['explained_label']})" if row.get("explained_label") else ""
    if "position" in row:
        token = row.get("explained_token")
        what = f"next token {token!r} (id {row['explained']}) after position {row['position']}"
    else:
        what = f"class {row['explained']}{label}"
    return f"{what}, score {row['explained_score']:.4g}, relevance sum {row['relevance_sum']:.4g}"


def _page(model, desc, sections):
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>onnxlrp text heatmap</title></head>"
            "<body style='font-family:sans-serif;max-width:60em'>\n"
            f"<h2>{html.escape(os.path.basename(model))}</h2>\n<p>{html.escape(desc)}. Red: relevance for the "
            "explained output, blue: against it, white: none. Hover a token for its value.</p>\n"
            + "\n".join(sections) + "\n</body></html>\n")
