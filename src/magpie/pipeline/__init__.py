"""From pre-query to record: the ordered, concurrent ``scheduler`` over a list
of ``stages`` (clean, reasoning, filters, dedup, judge, balance, guard; one
protocol in ``stages.base``), the model calls of one ``attempt``, its
``config``, the streaming ``repetition`` guard and the run's ``counters``."""
