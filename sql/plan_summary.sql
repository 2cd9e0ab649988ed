-- One row per plan from its manifest: mode, trigger, signal, counts (nonfinite: epoch N-1's NaN/inf metric values, not observations), weight range and checksum.
SELECT epoch, mode, metric, triggered,
       coalesce(CAST(to_json(manifests)->>'no_signal' AS BOOLEAN), false) AS no_signal,
       counts.eligible AS eligible, counts.hard AS hard, counts.regular_drawn AS regular_drawn,
       coalesce(CAST(to_json(counts)->>'nonfinite' AS BIGINT), 0) AS nonfinite,
       weights.min AS weight_min, weights.max AS weight_max,
       left(checksum, 12) AS checksum, engine
FROM manifests
ORDER BY epoch;
