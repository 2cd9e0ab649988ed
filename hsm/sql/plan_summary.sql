-- One row per plan from its manifest: mode, trigger, counts, weight range and checksum.
SELECT epoch, mode, metric, triggered,
       counts.eligible AS eligible, counts.hard AS hard, counts.regular_drawn AS regular_drawn,
       weights.min AS weight_min, weights.max AS weight_max,
       left(checksum, 12) AS checksum, engine
FROM manifests
ORDER BY epoch;
