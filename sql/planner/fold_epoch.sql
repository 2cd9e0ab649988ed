-- Fold one epoch of events into the per-sample state (the rules of hsm/mining/state.py).
-- Inputs: view `events` (key, x, global_step, rank, position, row: one epoch, attempts and
-- duplicates already resolved) and view `state` (key, n_obs, mean, ema, last, last_epoch:
-- the previous state, possibly empty), and view `state_epochs` (key, n_epochs, epoch_mean,
-- epoch_ema: the per-epoch aggregates, empty unless aggregate is epoch_ema or last).
-- Parameters: $decay DOUBLE, $epoch INTEGER.
-- Operations and their order match hsm.mining.engines.kernels.finish_fold (the Polars and numpy
-- engines' kernel) exactly, so every engine agrees bit for bit: the EMA and the sum run sequentially
-- in observation order. Events whose value is null, NaN or infinite never reach this query.
WITH observed AS (
    SELECT key,
           count(*) AS k,
           arg_min("row", (global_step, rank, position)) AS first_row,
           list(x ORDER BY global_step, rank, position) AS xs
    FROM events
    GROUP BY key
),
joined AS (
    SELECT coalesce(s.key, o.key) AS key,
           coalesce(s.n_obs, 0) AS n_prev,
           s.mean AS mean_prev, s.ema AS ema_prev, s.last AS last_prev, s.last_epoch AS last_epoch_prev,
           o.k, o.xs, o.first_row
    FROM state AS s
    FULL OUTER JOIN observed AS o ON s.key = o.key
),
with_epochs AS (
    SELECT j.*, e.n_epochs AS n_epochs_prev, e.epoch_mean AS epoch_mean_prev, e.epoch_ema AS epoch_ema_prev
    FROM joined AS j
    LEFT JOIN state_epochs AS e ON e.key = j.key
),
folded AS (
    SELECT *,
           list_reduce(
               xs[2:],
               lambda acc, v: CAST($decay AS DOUBLE) * acc + (CAST(1.0 AS DOUBLE) - CAST($decay AS DOUBLE)) * v,
               CASE WHEN n_prev = 0 THEN xs[1]
                    ELSE CAST($decay AS DOUBLE) * ema_prev + (CAST(1.0 AS DOUBLE) - CAST($decay AS DOUBLE)) * xs[1] END
           ) AS ema_new,
           list_reduce(xs[2:], lambda acc, v: acc + v, xs[1]) AS total,
           xs[-1] AS last_new
    FROM with_epochs
),
per_epoch AS (
    SELECT *, total / k AS epoch_mean_new
    FROM folded
)
SELECT key,
       CAST(CASE WHEN k IS NULL THEN n_prev ELSE n_prev + k END AS BIGINT) AS n_obs,
       CASE WHEN k IS NULL THEN mean_prev
            ELSE (coalesce(mean_prev, CAST(0.0 AS DOUBLE)) * n_prev + total) / (n_prev + k) END AS mean,
       CASE WHEN k IS NULL THEN ema_prev ELSE ema_new END AS ema,
       CASE WHEN k IS NULL THEN last_prev ELSE last_new END AS last,
       CAST(CASE WHEN k IS NULL THEN last_epoch_prev ELSE $epoch END AS INTEGER) AS last_epoch,
       CAST(coalesce(k, 0) AS BIGINT) AS k,
       CAST(coalesce(first_row, -1) AS BIGINT) AS first_row,
       CAST(CASE WHEN k IS NULL THEN n_epochs_prev ELSE coalesce(n_epochs_prev, 0) + 1 END AS INTEGER) AS n_epochs,
       CASE WHEN k IS NULL THEN epoch_mean_prev ELSE epoch_mean_new END AS epoch_mean,
       CASE WHEN k IS NULL THEN epoch_ema_prev
            ELSE CAST($decay AS DOUBLE) * coalesce(epoch_ema_prev, CAST(0.0 AS DOUBLE))
                 + (CAST(1.0 AS DOUBLE) - CAST($decay AS DOUBLE)) * epoch_mean_new END AS epoch_ema
FROM per_epoch
ORDER BY key
