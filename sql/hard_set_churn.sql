-- Hard-set churn between consecutive plans: hard samples kept, added, removed and the Jaccard similarity.
WITH plan_epochs AS (
    SELECT epoch, lag(epoch) OVER (ORDER BY epoch) AS previous_epoch
    FROM (SELECT DISTINCT epoch FROM plans)
),
hard AS (SELECT epoch, sample_id FROM plans WHERE is_hard),
current_hard AS (
    SELECT p.epoch, p.previous_epoch, h.sample_id FROM plan_epochs p JOIN hard h ON h.epoch = p.epoch
),
previous_hard AS (
    SELECT p.epoch, p.previous_epoch, h.sample_id FROM plan_epochs p JOIN hard h ON h.epoch = p.previous_epoch
),
paired AS (
    SELECT coalesce(c.epoch, v.epoch) AS epoch,
           coalesce(c.previous_epoch, v.previous_epoch) AS previous_epoch,
           c.sample_id AS now_id, v.sample_id AS before_id
    FROM current_hard c
    FULL OUTER JOIN previous_hard v ON c.epoch = v.epoch AND c.sample_id = v.sample_id
)
SELECT p.epoch,
       p.previous_epoch,
       count(x.now_id) AS hard,
       count(x.now_id) FILTER (WHERE x.before_id IS NOT NULL) AS kept,
       count(x.now_id) FILTER (WHERE x.before_id IS NULL) AS added,
       count(x.before_id) FILTER (WHERE x.now_id IS NULL) AS removed,
       CASE WHEN p.previous_epoch IS NULL OR count(x.epoch) = 0 THEN NULL
            ELSE round(count(x.now_id) FILTER (WHERE x.before_id IS NOT NULL) / count(x.epoch), 4) END AS jaccard
FROM plan_epochs p
LEFT JOIN paired x ON x.epoch = p.epoch
GROUP BY p.epoch, p.previous_epoch
ORDER BY p.epoch;
