"""From pre-query to record: the ordered, concurrent ``scheduler``, the
``stages`` every instruction passes (clean, filters, judge, dedup), the
streaming ``repetition`` guard and the run's ``counters``."""
