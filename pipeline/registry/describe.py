"""The registry's descriptions, in words, for whoever opens the model in the MLflow UI.

- the registered model: what LeanRec's model is, how it is served, what its aliases and tags mean;
- a version: which variant it is, the runs it came from, its figures (NDCG@10, size, latency, rounded
  to what they are worth), and, once the gate has judged it, the decision in words (promoted, kept the
  champion, refused) with the gate's reasons; a rollback adds a line.

Descriptions are written from the version's tags and the gate's report, so they say what those say;
writing one is best effort (a store that refuses it loses the text, never a promotion).
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.registry.store import (
    CHALLENGER,
    CHAMPION,
    TAG_CONTENT,
    TAG_HISTORY,
    TAG_TEACHER,
    figure_text,
    tag_key,
)

logger = logging.getLogger(__name__)

# What `register` created models with before descriptions said more: replaced, a user's own text is not.
LEGACY_MODEL_DESCRIPTION = "LeanRec SASRec recommender (teacher or compressed variant)"


def model_description(name: str) -> str:
    return (
        f"**{name}**: LeanRec's next-item recommender. A SASRec Transformer (the full-precision *teacher*) trained on "
        "users' interaction sequences, or one of its compressed variants (quantized, low-rank, pruned or distilled), "
        "whichever the registry policy picked for quality within the latency and size budgets.\n\n"
        "Each version is a pyfunc model: the model files plus the vocabularies and histories it serves with. Input: "
        "user IDs (and optionally item histories); output: the top-k item IDs with scores. Versions are described "
        "with their figures on the test split and the promotion gate's decision.\n\n"
        f"Aliases: `{CHAMPION}` is served; `{CHALLENGER}` is the newest registered candidate. The registered-model "
        f"tag `{TAG_HISTORY}` lists which version was champion when (`python -m pipeline champion-history`)."
    )


def _figure(tags: dict[str, str], figure: str) -> float | None:
    try:
        return float(tags[tag_key(figure)])
    except (KeyError, ValueError):
        return None


def registration_description(tags: dict[str, str], run_id: str | None) -> str:
    """What a version is, from the tags `register` gave it."""
    variant, kind = tags.get("leanrec.variant", "?"), tags.get("leanrec.kind", "?")
    teacher = tags.get(TAG_TEACHER)
    what = ("the full-precision SASRec teacher" if teacher is None or tags.get("leanrec.path") == teacher
            else f"a compressed variant (`{kind}`) of the SASRec teacher `{teacher}`")
    lines = [f"**{variant}**: {what}.", ""]
    runs = [f"registered by run `{run_id}`" if run_id else None,
            f"trained in run `{tags['leanrec.parent_run_id']}`" if tags.get("leanrec.parent_run_id") else None]
    if any(runs):
        said = ", ".join(r for r in runs if r)
        lines += [said[0].upper() + said[1:] + ".", ""]
    ndcg, hr, change = (_figure(tags, f) for f in ("ndcg@10", "hr@10", "ndcg@10_change"))
    where = f"{tags.get('leanrec.split') or 'test'} split, full ranking"
    if ndcg is not None:
        quality = f"- NDCG@10 **{figure_text('ndcg@10', ndcg)}** ({where})"
        if hr is not None:
            quality += f", HR@10 {figure_text('hr@10', hr)}"
        if change is not None and tags.get("leanrec.path") != teacher:
            quality += f"; {change:+.2%} NDCG@10 against the teacher"
        lines.append(quality)
    size, parameters = _figure(tags, "size_bytes"), _figure(tags, "parameters")
    if size is not None:
        lines.append(f"- size **{size / 2**20:.2f} MiB** ({size:,.0f} bytes on disk"
                     + (f", {parameters:,.0f} parameters)" if parameters is not None else ")"))
    p50, p95, throughput = (_figure(tags, f) for f in ("latency_p50_ms", "latency_p95_ms", "throughput_users_s"))
    if p50 is not None:
        latency = f"- latency p50 **{figure_text('latency_p50_ms', p50)} ms**"
        if p95 is not None:
            latency += f", p95 {figure_text('latency_p95_ms', p95)} ms"
        latency += f" (one user per call, {tags.get('leanrec.device') or 'cpu'})"
        if throughput is not None:
            latency += f"; {throughput:,.1f} users/s"
        lines.append(latency)
    lineage = [f"features sha256 `{tags['leanrec.features.sha256'][:12]}`" if tags.get("leanrec.features.sha256") else None,
               f"git commit `{tags['leanrec.git_commit'][:12]}`" if tags.get("leanrec.git_commit") else None,
               f"content sha256 `{tags[TAG_CONTENT][:12]}`" if tags.get(TAG_CONTENT) else None]
    if any(lineage):
        lines += ["", "Lineage: " + ", ".join(x for x in lineage if x) + "."]
    return "\n".join(lines)


def gate_description(report: dict) -> str:
    """The gate's decision on the challenger, in words, from promote's report."""
    decision, champion = report.get("decision"), report.get("champion_after") or report.get("champion_version")
    reference = report.get("reference_version") or report.get("champion_version")
    if decision == "promoted":
        verdict = (f"**Promoted**: champion since {report.get('at')}, replacing version {reference}." if reference
                   else f"**Promoted**: the first champion, since {report.get('at')}.")
    elif decision == "superseded":
        verdict = f"**Not promoted**: the champion alias moved to version {champion} while the gate ran; rerun promote."
    elif decision == "not_allowed":
        verdict = "**Not promoted**: it passed the gate, but registry.allow_promotion is false" + (
            f"; version {champion} stays champion." if champion else ".")
    elif decision == "rejected" and report.get("challenger"):  # scored and found wanting
        verdict = (f"**Kept champion**: the gate rejected it; version {champion} stays champion." if champion
                   else "**Not promoted**: the gate rejected it; there is no champion yet.")
    else:
        verdict = "**Refused**: the gate could not judge it" + (f"; version {champion} stays champion." if champion else ".")
    lines = [f"Gate ({report.get('at')}): {verdict}"]
    challenger_figures, champion_figures = report.get("challenger") or {}, report.get("champion") or {}
    if challenger_figures.get("ndcg@10") is not None:
        scored = f"NDCG@10 on this run's {report.get('split', 'test')} split: {figure_text('ndcg@10', challenger_figures['ndcg@10'])}"
        if champion_figures.get("ndcg@10") is not None:
            scored += f" against the champion's (version {reference}) {figure_text('ndcg@10', champion_figures['ndcg@10'])}"
        lines.append(f"- {scored}.")
    lines += [f"- {reason}" for reason in report.get("reasons", [])]
    return "\n".join(lines)


def describe_version(client: Any, name: str, version: str, gate: dict | None = None, footer: str | None = None) -> None:
    """Write a version's description: what it is (its tags), then the gate's decision and `footer`, if given.

    Without `gate`, a gate paragraph the description already holds is kept (a rollback adds its footer below it).
    """
    from mlflow.exceptions import MlflowException

    try:
        model_version = client.get_model_version(name, str(version))
        text = registration_description(model_version.tags, model_version.run_id)
        if gate is not None:
            text += "\n\n" + gate_description(gate)
        elif "\n\nGate (" in (model_version.description or ""):
            text += "\n\nGate (" + model_version.description.split("\n\nGate (", 1)[1]
        if footer:
            text += "\n\n" + footer
        client.update_model_version(name, str(version), description=text)
    except MlflowException as err:
        logger.warning("%s version %s: its description could not be written (%s)", name, version, err.message)


def describe_model(client: Any, name: str, current: str | None) -> None:
    """Describe the registered model, unless someone wrote their own description."""
    from mlflow.exceptions import MlflowException

    if (current or "").strip() not in ("", LEGACY_MODEL_DESCRIPTION):
        return  # ours already, or the user's own
    try:
        client.update_registered_model(name, description=model_description(name))
    except MlflowException as err:
        logger.warning("%s: its description could not be written (%s)", name, err.message)
