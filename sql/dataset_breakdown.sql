-- Per epoch and dataset: events, distinct samples, mean loss and token accuracy, share drawn as hard, tokens.
SELECT epoch,
       dataset,
       count(*) AS events,
       count(DISTINCT sample_id) AS samples,
       round(avg(loss), 5) AS mean_loss,
       round(avg(token_acc), 5) AS mean_token_acc,
       round(avg(CAST(drawn_as_hard AS INTEGER)), 4) AS hard_share,
       sum(n_tokens) AS tokens
FROM events
GROUP BY ALL
ORDER BY epoch, dataset;
