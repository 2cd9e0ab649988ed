-- The 20 hardest target samples of the latest plan, with their mean loss per epoch as a map epoch -> loss.
WITH latest AS (
    SELECT * FROM plans WHERE epoch = (SELECT max(epoch) FROM plans)
),
top AS (
    SELECT sample_id, dataset, base_idx, score, n_obs
    FROM latest
    ORDER BY score DESC, sample_id
    LIMIT 20
),
history AS (
    SELECT sample_id, epoch, avg(loss) AS loss
    FROM events
    WHERE sample_id IN (SELECT sample_id FROM top)
    GROUP BY ALL
)
SELECT t.sample_id, t.dataset, t.base_idx, round(t.score, 5) AS score, t.n_obs,
       map(list(h.epoch ORDER BY h.epoch) FILTER (WHERE h.epoch IS NOT NULL),
           list(round(h.loss, 4) ORDER BY h.epoch) FILTER (WHERE h.epoch IS NOT NULL)) AS loss_by_epoch
FROM top t
LEFT JOIN history h USING (sample_id)
GROUP BY ALL
ORDER BY score DESC, t.sample_id;
