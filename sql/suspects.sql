-- Label-noise suspects (Dataset Cartography) on the plan's metric: target samples drawn in >= 3 epochs, in the top 10% by mean per-epoch metric (a tie never floods it), with variability <= the median.
-- The same list as hsm.mining.suspects (report, suspects.csv): per (sample, epoch) the mean of the plan's metric
-- (event_values.value: 1 - token_acc for token_acc, 1 - det_f1 for det_f1, else the metric's own column), nulls, NaN and inf not observed.
WITH metric AS (
    SELECT coalesce((SELECT metric FROM manifests ORDER BY epoch DESC LIMIT 1), 'loss') AS name
),
observed AS (
    SELECT base_idx, sample_id, epoch,
           value
    FROM event_values
    WHERE dataset IN (SELECT DISTINCT dataset FROM plans)
),
per_epoch AS (
    SELECT base_idx, min(sample_id) AS sample_id, epoch, avg(value) AS value
    FROM observed
    WHERE value IS NOT NULL AND isfinite(value)
    GROUP BY base_idx, epoch
),
mapped AS (
    SELECT base_idx, min(sample_id) AS sample_id, count(*) AS n_epochs,
           avg(value) AS mean, stddev_pop(value) AS variability,
           map(list(epoch ORDER BY epoch), list(round(value, 4) ORDER BY epoch)) AS value_by_epoch
    FROM per_epoch
    GROUP BY base_idx
    HAVING count(*) >= 3
),
-- In the top 10%: at most ceil(0.1 * n) mapped samples have a mean >= its own (peers counted), so
-- a tie across that count is left out whole and all-equal means (no signal) give no suspects.
ranked AS (
    SELECT *, count(*) OVER (ORDER BY mean DESC RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS at_least,
           count(*) OVER () AS n_mapped
    FROM mapped
)
SELECT (SELECT DISTINCT dataset FROM plans LIMIT 1) AS dataset, base_idx, sample_id, n_epochs,
       round(mean, 5) AS mean, round(variability, 5) AS variability, value_by_epoch,
       (SELECT name FROM metric) AS metric
FROM ranked
WHERE at_least <= ceil(0.1 * n_mapped)
  AND variability <= (SELECT quantile_cont(variability, 0.5) FROM mapped)
ORDER BY mean DESC, sample_id;
