"""The prepare summary as a person reads it on the terminal."""

import json


def summary_text(s: dict) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "none"
    return "\n".join(
        [
            "== prepare summary ==",
            f"input rows        {s['input_rows']:>12,}",
            f"accepted          {s['accepted']:>12,}",
            f"rejected          {s['rejected']:>12,}   ({reasons})",
            f"duplicates dropped{s['duplicates_dropped']:>12,}",
            f"merged (bitmask)  {s['merged_into_bitmask']:>12,}",
            f"events in sequences{s['sequence_events']:>11,}",
            f"users             {s['users']:>12,}",
            f"items observed    {s['items_observed']:>12,}   universe ({s['item_universe']}): {s['num_items']:,}",
            f"actions           {json.dumps(s['actions'])} ({s['action_encoding']})",
            f"split             {s['split']['kind']}: train {s['train_users']:,} / valid {s['valid_users']:,} / test {s['test_users']:,} users",
            f"output            {s['output_dir']}  ({s['seconds']} s)",
            *oracle_lines(s),
        ]
    )


def oracle_lines(s: dict) -> list[str]:
    """The synthetic source's oracle (true next-item probabilities) and popularity baseline, per split."""
    o = s.get("synthetic_oracle")
    if not o or "test" not in o:
        return []
    lines = [f"oracle            leave-one-out, {o['oracle_users']:,} users ranked by their true next-item "
             f"probabilities (history removed, pessimistic ties)"
             + ("" if s["split"]["kind"] == "leave_one_out" else "; NOT this split")]
    for split in ("valid", "test"):
        for who in ("oracle", "popularity"):
            m = o[split][who]
            lines.append(f"  {split:5s} {who:10s}  " + "  ".join(f"{k.upper()} {m[k]:.4f}" for k in
                                                             ("hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@200")))
    acts = o["test"]["actions"]
    lines.append("  test  actions     " + "  ".join(
        f"{a} rate {v['rate']:.3f} NE {v['oracle_ne']:.3f} AUC {v['oracle_auc']:.3f}"
        if v["oracle_ne"] is not None and v["oracle_auc"] is not None else f"{a} rate {v['rate']:.3f}"
        for a, v in acts.items()))
    return lines
