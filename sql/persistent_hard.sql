-- Target samples that were hard in every plan so far, hardest first.
WITH plan_count AS (SELECT count(DISTINCT epoch) AS n FROM plans)
SELECT sample_id, dataset, base_idx,
       count(*) AS plans_hard,
       round(avg(score), 5) AS mean_score
FROM plans
WHERE is_hard
GROUP BY ALL
HAVING count(*) = (SELECT n FROM plan_count)
ORDER BY mean_score DESC, sample_id;
