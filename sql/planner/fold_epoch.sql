-- Fold one epoch of events into the per-sample state (SPEC section 8, hsm/state.py).
-- Inputs: views `events` (one epoch, attempts already resolved) and `state`
-- (the previous state, possibly empty). Parameters: $decay DOUBLE, $epoch INTEGER,
-- $metric ('loss' | 'token_acc'), $use_ema BOOLEAN.
-- Operations and their order match hsm.engines.polars_engine exactly, so both
-- engines agree bit for bit: the EMA and the sum run sequentially in observation order.
WITH ev AS (
    SELECT dataset, base_idx, sample_id, epoch, global_step, rank, position,
           CASE WHEN $metric = 'loss' THEN CAST(loss AS DOUBLE)
                ELSE CAST(1.0 AS DOUBLE) - CAST(token_acc AS DOUBLE) END AS x
    FROM events
),
observed AS (
    SELECT dataset, base_idx,
           arg_min(sample_id, (epoch, global_step, rank, position)) AS sample_id,
           count(*) AS k,
           list(x ORDER BY epoch, global_step, rank, position) AS xs
    FROM ev
    GROUP BY dataset, base_idx
),
joined AS (
    SELECT coalesce(s.dataset, o.dataset) AS dataset,
           coalesce(s.base_idx, o.base_idx) AS base_idx,
           coalesce(s.sample_id, o.sample_id) AS sample_id,
           coalesce(s.n_obs, 0) AS n_prev,
           s.mean AS mean_prev, s.ema AS ema_prev, s.last AS last_prev,
           s.last_epoch AS last_epoch_prev,
           o.k, o.xs
    FROM state AS s
    FULL OUTER JOIN observed AS o ON s.dataset = o.dataset AND s.base_idx = o.base_idx
),
folded AS (
    SELECT dataset, base_idx, sample_id, n_prev, mean_prev, ema_prev, last_prev, last_epoch_prev, k,
           list_reduce(
               xs[2:],
               lambda acc, v: CAST($decay AS DOUBLE) * acc + (CAST(1.0 AS DOUBLE) - CAST($decay AS DOUBLE)) * v,
               CASE WHEN n_prev = 0 THEN xs[1]
                    ELSE CAST($decay AS DOUBLE) * ema_prev + (CAST(1.0 AS DOUBLE) - CAST($decay AS DOUBLE)) * xs[1] END
           ) AS ema_new,
           list_reduce(xs[2:], lambda acc, v: acc + v, xs[1]) AS total,
           xs[-1] AS last_new
    FROM joined
),
updated AS (
    SELECT sample_id, dataset, base_idx,
           CASE WHEN k IS NULL THEN n_prev ELSE n_prev + k END AS n_obs,
           CASE WHEN k IS NULL THEN mean_prev
                ELSE (coalesce(mean_prev, CAST(0.0 AS DOUBLE)) * n_prev + total) / (n_prev + k) END AS mean,
           CASE WHEN k IS NULL THEN ema_prev ELSE ema_new END AS ema,
           CASE WHEN k IS NULL THEN last_prev ELSE last_new END AS last,
           CASE WHEN k IS NULL THEN last_epoch_prev ELSE CAST($epoch AS INTEGER) END AS last_epoch
    FROM folded
)
SELECT sample_id, dataset, base_idx, n_obs, mean, ema, last, last_epoch,
       CASE WHEN $use_ema AND n_obs >= 3 THEN ema ELSE mean END AS score
FROM updated
ORDER BY dataset, base_idx
