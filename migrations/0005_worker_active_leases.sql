-- `workers.active_leases` is kept equal to the worker's active leases by the statements
-- that start and end leases, through the triggers below, so a claim checks a worker's
-- capacity by reading one row instead of counting its leases (counting walks the dead
-- entries that every ended lease leaves in the index until vacuum removes them).
--
-- Leases only ever go from 'active' to an ended status, never back, and never change
-- worker. Worker rows are locked in id order, as claims lock them, so a batch touching
-- several workers cannot deadlock with a claim.

CREATE OR REPLACE FUNCTION bloom_leases_started() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM workers
    WHERE id IN (SELECT worker_id FROM started WHERE status = 'active') ORDER BY id FOR UPDATE;
    UPDATE workers w SET active_leases = w.active_leases + s.n
    FROM (SELECT worker_id, count(*)::int AS n FROM started WHERE status = 'active' GROUP BY worker_id) s
    WHERE w.id = s.worker_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION bloom_leases_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM workers
    WHERE id IN (SELECT b.worker_id FROM before_rows b JOIN after_rows a ON a.id = b.id
                 WHERE b.status = 'active' AND a.status <> 'active')
    ORDER BY id FOR UPDATE;
    UPDATE workers w SET active_leases = GREATEST(w.active_leases - e.n, 0)
    FROM (SELECT b.worker_id, count(*)::int AS n FROM before_rows b JOIN after_rows a ON a.id = b.id
          WHERE b.status = 'active' AND a.status <> 'active' GROUP BY b.worker_id) e
    WHERE w.id = e.worker_id;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION bloom_leases_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM workers
    WHERE id IN (SELECT worker_id FROM gone WHERE status = 'active') ORDER BY id FOR UPDATE;
    UPDATE workers w SET active_leases = GREATEST(w.active_leases - g.n, 0)
    FROM (SELECT worker_id, count(*)::int AS n FROM gone WHERE status = 'active' GROUP BY worker_id) g
    WHERE w.id = g.worker_id;
    RETURN NULL;
END $$;

-- A worker row created while its id holds leases (re-registered after a removal)
-- starts from their count.
CREATE OR REPLACE FUNCTION bloom_worker_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.active_leases := (SELECT count(*) FROM leases WHERE worker_id = NEW.id AND status = 'active');
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS leases_started ON leases;
CREATE TRIGGER leases_started AFTER INSERT ON leases
    REFERENCING NEW TABLE AS started FOR EACH STATEMENT EXECUTE FUNCTION bloom_leases_started();
DROP TRIGGER IF EXISTS leases_ended ON leases;
CREATE TRIGGER leases_ended AFTER UPDATE ON leases
    REFERENCING OLD TABLE AS before_rows NEW TABLE AS after_rows FOR EACH STATEMENT EXECUTE FUNCTION bloom_leases_ended();
DROP TRIGGER IF EXISTS leases_deleted ON leases;
CREATE TRIGGER leases_deleted AFTER DELETE ON leases
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION bloom_leases_deleted();
DROP TRIGGER IF EXISTS workers_inserted ON workers;
CREATE TRIGGER workers_inserted BEFORE INSERT ON workers
    FOR EACH ROW EXECUTE FUNCTION bloom_worker_inserted();

-- Existing rows start from the truth (the column was never maintained before).
UPDATE workers w SET active_leases = (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active');
