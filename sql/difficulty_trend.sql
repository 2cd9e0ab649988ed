-- Difficulty per plan epoch: count and score mean/p50/p90 of hard vs regular target samples.
SELECT epoch,
       CASE WHEN is_hard THEN 'hard' ELSE 'regular' END AS pool,
       count(*) AS samples,
       avg(score) AS mean_score,
       quantile_cont(score, 0.5) AS p50_score,
       quantile_cont(score, 0.9) AS p90_score
FROM plans
GROUP BY ALL
ORDER BY epoch, pool;
