-- Label-noise suspects (Dataset Cartography): target samples in the top 10% of every epoch they were drawn in (>= 3 epochs) with low variability.
WITH metric AS (
    SELECT coalesce((SELECT metric FROM manifests ORDER BY epoch DESC LIMIT 1), 'loss') AS name
),
per_epoch AS (
    SELECT base_idx, min(sample_id) AS sample_id, epoch,
           avg(CASE WHEN (SELECT name FROM metric) = 'token_acc' THEN 1.0 - CAST(token_acc AS DOUBLE)
                    ELSE CAST(loss AS DOUBLE) END) AS value
    FROM events
    WHERE dataset IN (SELECT DISTINCT dataset FROM plans)
    GROUP BY base_idx, epoch
),
epoch_cut AS (
    SELECT epoch, quantile_cont(value, 0.9) AS cut FROM per_epoch GROUP BY epoch
),
per_sample AS (
    SELECT p.base_idx, min(p.sample_id) AS sample_id, count(*) AS n_epochs,
           avg(p.value) AS mean, stddev_pop(p.value) AS variability,
           bool_and(p.value >= c.cut) AS always_top,
           map(list(p.epoch ORDER BY p.epoch), list(round(p.value, 4) ORDER BY p.epoch)) AS value_by_epoch
    FROM per_epoch p JOIN epoch_cut c USING (epoch)
    GROUP BY p.base_idx
),
mapped AS (SELECT * FROM per_sample WHERE n_epochs >= 3)
SELECT (SELECT DISTINCT dataset FROM plans LIMIT 1) AS dataset, base_idx, sample_id, n_epochs,
       round(mean, 5) AS mean, round(variability, 5) AS variability, value_by_epoch,
       (SELECT name FROM metric) AS metric
FROM mapped
WHERE always_top AND variability <= (SELECT quantile_cont(variability, 0.5) FROM mapped)
ORDER BY mean DESC, sample_id;
