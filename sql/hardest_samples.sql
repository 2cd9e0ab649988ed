-- The 20 hardest target samples of the latest plan, with their mean per-epoch metric (the plan's metric) as a map epoch -> value.
-- score and value_by_epoch are in one unit, the plan's metric: 1 - token_acc for token_acc, else the metric's own column.
WITH metric AS (
    SELECT coalesce((SELECT metric FROM manifests ORDER BY epoch DESC LIMIT 1), 'loss') AS name
),
latest AS (
    SELECT * FROM plans WHERE epoch = (SELECT max(epoch) FROM plans)
),
top AS (
    SELECT sample_id, dataset, base_idx, score, n_obs
    FROM latest
    ORDER BY score DESC, sample_id
    LIMIT 20
),
history AS (
    SELECT sample_id, epoch,
           avg(value) AS value
    FROM event_values
    WHERE sample_id IN (SELECT sample_id FROM top)
    GROUP BY ALL
)
SELECT t.sample_id, t.dataset, t.base_idx, round(t.score, 5) AS score, t.n_obs,
       map(list(h.epoch ORDER BY h.epoch) FILTER (WHERE h.epoch IS NOT NULL AND h.value IS NOT NULL),
           list(round(h.value, 4) ORDER BY h.epoch) FILTER (WHERE h.epoch IS NOT NULL AND h.value IS NOT NULL))
           AS value_by_epoch,
       (SELECT name FROM metric) AS metric
FROM top t
LEFT JOIN history h USING (sample_id)
GROUP BY ALL
ORDER BY score DESC, t.sample_id;
