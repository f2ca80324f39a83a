-- Differential corpus: every query runs on the sharded cluster (through the
-- proxy) and on one unsharded Postgres holding the same rows (the oracle),
-- in text (simple protocol) and binary (extended protocol) result formats.
-- The answers must be equal, or the proxy must refuse with 0A000.
--
-- One query per line. Prefixes:
--   !            the proxy must answer (a 0A000 refusal fails the test)
--   [ordered]    rows are compared in order (the ORDER BY is total)
--   [ordered:N,M] rows are compared in the order of output columns N, M;
--                rows tied on them are compared as multisets
--   (none)       rows are compared as multisets
--
-- Tables: users (sharded by id), orders (by user_id, co-located), countries
-- (reference). See tests/tests/differential.rs for the data.

-- Point reads, IN lists, ANY, ranges, filters (one or several shards)
! SELECT * FROM users WHERE id = 17
! SELECT * FROM users WHERE id = -17
! SELECT name, city FROM users WHERE id IN (1, 2, 3, 500, 1999)
! SELECT id, score FROM users WHERE id = ANY('{5,6,7,8,9}')
! SELECT id, name FROM users WHERE id BETWEEN 10 AND 40
! SELECT id, name FROM users WHERE id > 1990
! SELECT id FROM users WHERE id < -1990
! SELECT * FROM users WHERE city = 'Zürich'
! SELECT * FROM users WHERE city IS NULL
! SELECT id, city FROM users WHERE city IS NOT NULL AND age > 60
! SELECT id FROM users WHERE false
! SELECT id FROM users WHERE id = 123456789
! SELECT * FROM users WHERE id IN (3, 3, 3)
! SELECT id, active FROM users WHERE active
! SELECT id, active FROM users WHERE NOT active AND age < 25
! SELECT id, name FROM users WHERE name LIKE 'É%'
! SELECT id, name FROM users WHERE name ILIKE '%ø%'
! SELECT id, born FROM users WHERE born > '1990-01-01'
! SELECT id, created FROM users WHERE created >= '2024-06-01 00:00:00+00'
! SELECT id, score FROM users WHERE score > 500.5
! SELECT id, score FROM users WHERE score IS NULL
! SELECT * FROM orders WHERE user_id = 42
! SELECT * FROM orders WHERE user_id IN (42, 43, 44, 45)
! SELECT user_id, id, amount FROM orders WHERE amount > 990
! SELECT user_id, id FROM orders WHERE status = 'refunded' AND qty IS NULL
! SELECT user_id, id, weight FROM orders WHERE weight < 1.5
! SELECT user_id, id, placed FROM orders WHERE placed < '2024-01-03'
! SELECT * FROM orders WHERE user_id = 42 AND id = 42000
! SELECT * FROM orders WHERE false
-- Expressions over rows (computed on each shard)
! SELECT id, score * 2, score / 3, round(score, 1) FROM users WHERE id < 50
! SELECT id, age + 1, age * age, -age FROM users WHERE id BETWEEN -20 AND 20
! SELECT id, upper(name), lower(city), length(name) FROM users WHERE id < 30
! SELECT id, coalesce(city, 'none'), nullif(age, 30) FROM users WHERE id < 100
! SELECT id, created + interval '1 day', date_trunc('month', created) FROM users WHERE id < 30
! SELECT id, extract(epoch FROM created), to_char(born, 'YYYY-MM') FROM users WHERE id < 30
! SELECT user_id, id, amount * qty, amount::int8 FROM orders WHERE user_id < 10
! SELECT user_id, id, extract(dow FROM placed), placed::date FROM orders WHERE user_id < 10
! SELECT id, CASE WHEN age < 30 THEN 'young' ELSE 'not' END FROM users WHERE id < 60
! SELECT id, name || ' from ' || coalesce(city, '?') FROM users WHERE id < 40
! SELECT id, score::text, age::numeric / 7 FROM users WHERE id < 40
! SELECT 1 AS one, id FROM users WHERE id = 5
-- Co-located joins
! SELECT u.name, o.amount FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = 42
! SELECT u.id, o.id, o.amount FROM users u JOIN orders o ON o.user_id = u.id
! SELECT u.id, o.id FROM users u JOIN orders o ON o.user_id = u.id WHERE o.status = 'shipped' AND u.age > 70
! SELECT u.id, o.id FROM users u JOIN orders o ON u.id = o.user_id WHERE u.id IN (7, 8, 9)
! SELECT u.id, u.city, o.amount FROM users u, orders o WHERE o.user_id = u.id AND o.amount < 20
! SELECT u.id, o.id FROM users u LEFT JOIN orders o ON o.user_id = u.id WHERE u.id < 0 AND u.id > -40
! SELECT u.id, count(o.id) FROM users u LEFT JOIN orders o ON o.user_id = u.id WHERE u.id = 11 GROUP BY u.id
-- Reference tables (one copy per shard)
! SELECT * FROM countries
! SELECT code, name FROM countries WHERE population > 1000000
! SELECT count(*) FROM countries
! SELECT max(population), min(name) FROM countries
! [ordered] SELECT code FROM countries ORDER BY population DESC NULLS LAST, code
! SELECT u.id, c.name FROM users u JOIN countries c ON c.code = u.country WHERE u.id = 42
! SELECT u.id, c.name FROM users u JOIN countries c ON c.code = u.country
! SELECT c.name, count(*) FROM users u JOIN countries c ON c.code = u.country GROUP BY c.name
-- ORDER BY across shards: k-way merge
! [ordered] SELECT id, name FROM users ORDER BY id
! [ordered] SELECT id, name FROM users ORDER BY id DESC
! [ordered] SELECT id FROM users ORDER BY id LIMIT 10
! [ordered] SELECT id FROM users ORDER BY id DESC LIMIT 10
! [ordered] SELECT id FROM users ORDER BY id LIMIT 10 OFFSET 5
! [ordered] SELECT id FROM users ORDER BY id OFFSET 1990
! [ordered] SELECT id FROM users ORDER BY id LIMIT 0
! [ordered] SELECT id FROM users ORDER BY id FETCH FIRST 7 ROWS ONLY
! [ordered] SELECT id, city FROM users ORDER BY city, id
! [ordered] SELECT id, city FROM users ORDER BY city NULLS FIRST, id
! [ordered] SELECT id, city FROM users ORDER BY city DESC, id
! [ordered] SELECT id, city FROM users ORDER BY city DESC NULLS LAST, id DESC
! [ordered] SELECT id, name FROM users ORDER BY name, id
! [ordered] SELECT id, name FROM users ORDER BY name COLLATE "C", id
! [ordered] SELECT id, name FROM users ORDER BY lower(name), id
! [ordered] SELECT id, score FROM users ORDER BY score, id
! [ordered] SELECT id, score FROM users ORDER BY score DESC NULLS LAST, id
! [ordered] SELECT id, age FROM users ORDER BY age, id
! [ordered] SELECT id, age, name FROM users ORDER BY age DESC, name, id
! [ordered] SELECT id, created FROM users ORDER BY created, id
! [ordered] SELECT id, born FROM users ORDER BY born DESC, id LIMIT 25
! [ordered] SELECT id, active FROM users ORDER BY active, id
! [ordered] SELECT name FROM users ORDER BY id
! [ordered] SELECT name FROM users ORDER BY id DESC LIMIT 20
! [ordered] SELECT id FROM users ORDER BY age + id % 7, id
! [ordered] SELECT id, age FROM users ORDER BY 2, 1
! [ordered] SELECT id, score * 2 AS double FROM users ORDER BY double NULLS FIRST, id
! [ordered] SELECT id FROM users WHERE city = 'Zürich' ORDER BY id
! [ordered] SELECT id FROM users WHERE id IN (1, 2, 3, 4, 5, 6, 7, 8) ORDER BY id DESC
! [ordered] SELECT id FROM users WHERE id = 5 ORDER BY id
! [ordered] SELECT id FROM users WHERE false ORDER BY id
! [ordered:1] SELECT age, name FROM users ORDER BY age
! [ordered:1] SELECT age, id FROM users ORDER BY age DESC LIMIT 500
! [ordered:1] SELECT city, id FROM users ORDER BY city NULLS FIRST
! [ordered:1] SELECT active, id FROM users ORDER BY active
! [ordered] SELECT user_id, id, amount FROM orders ORDER BY amount DESC, user_id, id LIMIT 20
! [ordered] SELECT user_id, id, placed FROM orders ORDER BY placed, user_id, id LIMIT 50
! [ordered] SELECT user_id, id FROM orders ORDER BY user_id, id
! [ordered] SELECT user_id, id, weight FROM orders ORDER BY weight DESC NULLS LAST, user_id, id LIMIT 30
! [ordered:1] SELECT status, amount FROM orders ORDER BY status
! [ordered] SELECT user_id, id FROM orders WHERE user_id = 42 ORDER BY id
! [ordered] SELECT u.id, o.id FROM users u JOIN orders o ON o.user_id = u.id ORDER BY o.amount, u.id, o.id LIMIT 40
-- Aggregates without GROUP BY
! SELECT count(*) FROM users
! SELECT count(*) FROM orders
! SELECT count(city) FROM users
! SELECT count(DISTINCT city) FROM users
! SELECT count(DISTINCT age) FROM users
! SELECT sum(age) FROM users
! SELECT sum(id) FROM users
! SELECT sum(score) FROM users
! SELECT sum(amount) FROM orders
! SELECT sum(qty) FROM orders
! SELECT avg(age) FROM users
! SELECT avg(score) FROM users
! SELECT avg(amount) FROM orders
! SELECT min(id), max(id) FROM users
! SELECT min(name), max(name) FROM users
! SELECT min(city), max(city) FROM users
! SELECT min(score), max(score) FROM users
! SELECT min(created), max(created) FROM users
! SELECT min(born), max(born) FROM users
! SELECT min(placed), max(placed) FROM orders
! SELECT bool_and(active), bool_or(active) FROM users
! SELECT bool_and(age > 10), bool_or(age > 90) FROM users
! SELECT count(*), sum(age), min(age), max(age), avg(age) FROM users
! SELECT count(*) FROM users WHERE false
! SELECT sum(age), min(age), max(age), avg(age) FROM users WHERE false
! SELECT count(*) FROM users WHERE city IS NULL
! SELECT count(*) FILTER (WHERE active), sum(age) FILTER (WHERE city IS NULL) FROM users
! SELECT max(id) FILTER (WHERE active) FROM users
! SELECT sum(score) FROM users WHERE score IS NULL
! SELECT count(*) FROM users WHERE id IN (1, 2, 3, 4, 5, 6)
! SELECT sum(amount), count(*) FROM orders WHERE user_id IN (1, 2, 3, 4)
! SELECT count(*) FROM users u JOIN orders o ON o.user_id = u.id
! SELECT sum(o.amount) FROM users u JOIN orders o ON o.user_id = u.id WHERE u.active
SELECT count(*) + 1, max(age) - min(age) FROM users
-- GROUP BY and HAVING
! SELECT city, count(*) FROM users GROUP BY city
! SELECT active, count(*), sum(age), avg(score) FROM users GROUP BY active
! SELECT age, count(*) FROM users GROUP BY age
! SELECT city, active, count(*) FROM users GROUP BY city, active
! SELECT city, min(name), max(name), min(created) FROM users GROUP BY city
! SELECT city, bool_and(active), bool_or(active) FROM users GROUP BY city
! SELECT status, count(*), sum(amount), min(placed), max(placed) FROM orders GROUP BY status
! SELECT status, avg(amount), sum(qty), count(qty) FROM orders GROUP BY status
! SELECT user_id, sum(amount) FROM orders GROUP BY user_id
! SELECT user_id, count(*) FROM orders WHERE user_id < 50 GROUP BY user_id
! SELECT city, count(*) FROM users GROUP BY city HAVING count(*) > 100
! SELECT age, count(*) FROM users GROUP BY age HAVING sum(score) > 1000
! SELECT status, sum(amount) FROM orders GROUP BY status HAVING avg(amount) > 400
! SELECT city, count(*) FROM users WHERE false GROUP BY city
! SELECT date_trunc('month', created), count(*) FROM users GROUP BY 1
! SELECT extract(year FROM born), count(*), min(id) FROM users GROUP BY 1
! SELECT lower(city), count(*) FROM users GROUP BY lower(city)
! SELECT age % 10, sum(age) FROM users GROUP BY age % 10
! SELECT count(*), city FROM users GROUP BY city
! [ordered] SELECT city, count(*) FROM users GROUP BY city ORDER BY count(*) DESC, city NULLS LAST
! [ordered] SELECT age, count(*) FROM users GROUP BY age ORDER BY age
! [ordered] SELECT age, count(*) FROM users GROUP BY age ORDER BY age DESC LIMIT 5
! [ordered] SELECT status, sum(amount) FROM orders GROUP BY status ORDER BY sum(amount) DESC
! [ordered] SELECT city, count(*) FROM users GROUP BY city HAVING count(*) > 50 ORDER BY city
! [ordered] SELECT user_id, sum(amount) AS total FROM orders GROUP BY user_id ORDER BY total DESC, user_id LIMIT 10
! [ordered] SELECT user_id, count(*) FROM orders GROUP BY user_id ORDER BY user_id LIMIT 20 OFFSET 10
-- DISTINCT and DISTINCT ON
! SELECT DISTINCT city FROM users
! SELECT DISTINCT age FROM users
! SELECT DISTINCT active, city FROM users
! SELECT DISTINCT status FROM orders
! SELECT DISTINCT user_id FROM orders WHERE amount > 900
! [ordered] SELECT DISTINCT city FROM users ORDER BY city NULLS FIRST
! [ordered] SELECT DISTINCT age FROM users ORDER BY age DESC LIMIT 10
! [ordered] SELECT DISTINCT ON (city) city, id FROM users ORDER BY city, id
! [ordered] SELECT DISTINCT ON (age) age, id, name FROM users ORDER BY age, id DESC
! [ordered] SELECT DISTINCT ON (status) status, user_id, id FROM orders ORDER BY status, amount DESC, user_id, id
-- Unicode text
! SELECT id, name FROM users WHERE city = '東京'
! SELECT id, name FROM users WHERE city = 'São Paulo'
! SELECT id FROM users WHERE name = 'Ørjan 10'
! [ordered] SELECT id, city FROM users WHERE city IN ('Zürich', 'zurich', 'Zurich', 'Ålesund', 'apple', 'Apple') ORDER BY city, id
! SELECT city, count(*) FROM users WHERE city > 'Z' GROUP BY city
! SELECT max(name), min(name) FROM users WHERE name LIKE 'É%'
-- Hidden sort columns with *, key-grouped aggregates (any aggregate: each
-- group lives on one shard), FILTER, HAVING with OR / NOT / IS NULL
! [ordered] SELECT * FROM users ORDER BY id LIMIT 5
! [ordered] SELECT name FROM users ORDER BY created DESC, id LIMIT 5
! [ordered] SELECT id FROM users ORDER BY score DESC NULLS LAST, id OFFSET 10 LIMIT 5
! [ordered] SELECT DISTINCT ON (country) country, name FROM users ORDER BY country, score DESC NULLS LAST, id
! SELECT count(DISTINCT id), count(*) FROM users
! SELECT count(DISTINCT city) FROM users WHERE false
! SELECT count(DISTINCT lower(city)), count(DISTINCT country), max(age) FROM users
! SELECT active, count(DISTINCT country), count(DISTINCT city), sum(age) FROM users GROUP BY active HAVING count(DISTINCT city) > 3
! SELECT status, count(DISTINCT qty) FILTER (WHERE amount > 500), avg(amount) FROM orders GROUP BY status
! [ordered] SELECT country, count(DISTINCT city) AS cities FROM users GROUP BY country ORDER BY cities DESC, country
! SELECT count(DISTINCT score) FROM users
! SELECT user_id, string_agg(status, ',' ORDER BY id) FROM orders GROUP BY user_id
! [ordered] SELECT user_id, count(*), array_agg(id ORDER BY id) FROM orders GROUP BY user_id HAVING count(*) > 5 ORDER BY count(*) DESC, user_id LIMIT 10
! SELECT status, avg(qty), min(amount), max(weight) FROM orders GROUP BY status HAVING avg(qty) >= 5 OR max(weight) IS NULL
! SELECT active, sum(id), count(born), max(born) FROM users GROUP BY active HAVING NOT bool_and(active)
! SELECT min(id) FILTER (WHERE city IS NULL), avg(age) FILTER (WHERE active) FROM users
! [ordered] SELECT city, avg(age) AS a FROM users GROUP BY city ORDER BY a DESC, city NULLS FIRST LIMIT 3
! SELECT country, count(*), sum(score) FROM users WHERE id IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10) GROUP BY country
! [ordered] SELECT born, count(*) FROM users GROUP BY born HAVING count(*) > 1 ORDER BY born DESC NULLS LAST LIMIT 5

! SELECT avg(score), sum(score), avg(id), sum(id) FROM users WHERE city = 'Berlin'
-- What a merge cannot answer exactly: refused, or (if merged) exact
SELECT sum(weight) FROM orders
SELECT max(created) - min(created) FROM users
SELECT avg(weight), status FROM orders GROUP BY status
SELECT extract(year FROM born) AS y, count(*) FROM users GROUP BY y
SELECT id, row_number() OVER (ORDER BY id) FROM users
SELECT id, sum(age) OVER () FROM users WHERE id < 20
SELECT o.id FROM orders o JOIN users u ON u.age = o.qty WHERE o.user_id < 5
SELECT * FROM users WHERE id IN (SELECT user_id FROM orders WHERE amount > 990)
SELECT id FROM users WHERE id < 5 UNION SELECT user_id FROM orders WHERE user_id < 5
SELECT id FROM users WHERE id < 5 INTERSECT SELECT user_id FROM orders
SELECT id FROM users WHERE id < 5 EXCEPT SELECT user_id FROM orders WHERE user_id < 3
WITH big AS (SELECT user_id FROM orders WHERE amount > 950) SELECT count(*) FROM big
SELECT (SELECT count(*) FROM orders), count(*) FROM users
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY age) FROM users
SELECT string_agg(name, ',' ORDER BY id) FROM users WHERE id < 10
SELECT array_agg(id ORDER BY id) FROM users WHERE id < 10
SELECT stddev(age), variance(age) FROM users
! SELECT count(DISTINCT city), count(*) FROM users GROUP BY active
SELECT mode() WITHIN GROUP (ORDER BY city) FROM users

-- Outer joins that keep a reference table's or a VALUES list's rows: every
-- shard holds those rows, so on several shards each unmatched row would come
-- back once per shard. Refused there; exact on one shard.
SELECT c.code, count(u.id) FROM countries c LEFT JOIN users u ON u.country = c.code GROUP BY c.code
SELECT c.code, u.id FROM countries c LEFT JOIN users u ON u.country = c.code AND u.age > 200
SELECT c.code, u.id FROM users u RIGHT JOIN countries c ON u.country = c.code AND u.age > 200
SELECT c.code, u.id FROM countries c FULL JOIN users u ON u.country = c.code AND u.age > 200 WHERE u.id IS NULL OR u.id < -1995
SELECT v.x, u.name FROM (VALUES (1), (2), (999999)) v(x) LEFT JOIN users u ON u.id = v.x
SELECT c.code FROM countries c LEFT JOIN users u ON u.country = c.code WHERE u.id IS NULL
! SELECT c.code, u.id FROM countries c LEFT JOIN users u ON u.country = c.code WHERE u.id = 7
! SELECT u.id, c.name FROM users u LEFT JOIN countries c ON c.code = u.country WHERE u.id < -1990
! SELECT u.id, c.name FROM countries c RIGHT JOIN users u ON c.code = u.country WHERE u.id > 1990
-- Keys on the nullable side of an outer join: NULL in the unmatched rows on
-- every shard (one NULL group, orphan orders found on every shard)
! SELECT o.user_id, count(*) FROM users u LEFT JOIN orders o ON o.user_id = u.id AND o.amount > 990 GROUP BY o.user_id
! SELECT DISTINCT o.user_id FROM users u LEFT JOIN orders o ON o.user_id = u.id AND o.amount > 995
! SELECT count(*) FROM orders o LEFT JOIN users u ON u.id = o.user_id WHERE u.id IS NULL
! SELECT o.id, o.user_id FROM orders o LEFT JOIN users u ON u.id = o.user_id WHERE u.id IS NULL
! SELECT o.user_id, count(*) FROM orders o LEFT JOIN users u ON u.id = o.user_id WHERE u.id IS NULL GROUP BY o.user_id
-- count(DISTINCT key) beside another count(DISTINCT ...)
! SELECT count(DISTINCT user_id), count(DISTINCT status) FROM orders
! SELECT status, count(DISTINCT user_id), count(DISTINCT qty) FROM orders GROUP BY status
! SELECT count(DISTINCT o.user_id), count(DISTINCT o.status) FROM orders o WHERE amount > 500
-- LIMIT + OFFSET past bigint's range: saturated, as one server answers
! [ordered] SELECT id FROM users ORDER BY id LIMIT 9223372036854775807 OFFSET 3990
! [ordered] SELECT id FROM users ORDER BY id DESC LIMIT 9223372036854775806 OFFSET 3995
-- A set-returning function in FROM beside a sharded table
! SELECT g, u.name FROM generate_series(1, 30) g JOIN users u ON u.id = g
! SELECT g, count(o.id) FROM generate_series(-5, 5) g JOIN orders o ON o.user_id = g GROUP BY g
SELECT g, u.name FROM generate_series(1, 3) g LEFT JOIN users u ON u.id = g
-- HAVING with BETWEEN and IN; constant LIMIT expressions; GROUP BY the
-- key's position (then any aggregate is exact)
! SELECT country, count(*) FROM users GROUP BY country HAVING count(*) BETWEEN 600 AND 700
! SELECT status, count(*), sum(amount) FROM orders GROUP BY status HAVING count(*) NOT BETWEEN 1 AND 10
! SELECT country, count(*), max(age) FROM users GROUP BY country HAVING count(*) IN (1, 2, 3) OR max(age) NOT IN (87)
! [ordered] SELECT id FROM users ORDER BY id LIMIT (2 + 1) OFFSET 2 * 3
! [ordered] SELECT id, name FROM users ORDER BY id DESC LIMIT 10 - 4
! SELECT user_id, avg(amount), sum(DISTINCT qty), count(*) FROM orders GROUP BY 1
! [ordered:1] SELECT user_id, avg(amount) FROM orders GROUP BY 1 ORDER BY 1 LIMIT 10
-- Window functions partitioned by the sharding key: whole on each shard
! SELECT user_id, id, rank() OVER (PARTITION BY user_id ORDER BY amount DESC, id) FROM orders WHERE user_id BETWEEN -60 AND 60
! [ordered] SELECT user_id, id, sum(amount) OVER (PARTITION BY user_id ORDER BY id) FROM orders ORDER BY 1, 2 LIMIT 40
! SELECT user_id, count(*), rank() OVER (PARTITION BY user_id ORDER BY count(*)) FROM orders GROUP BY user_id
! [ordered] SELECT u.id, o.id, row_number() OVER (PARTITION BY u.id ORDER BY o.placed, o.id) FROM users u JOIN orders o ON o.user_id = u.id WHERE u.age > 80 ORDER BY 1, 2
SELECT status, rank() OVER (PARTITION BY status ORDER BY amount) FROM orders
-- Subqueries co-located on the key: EXISTS / NOT EXISTS correlated on it,
-- key IN (SELECT key ...)
! SELECT u.id, u.name FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id AND o.amount > 990)
! SELECT count(*) FROM users u WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id AND o.status = 'paid')
! SELECT id FROM users WHERE id IN (SELECT user_id FROM orders WHERE amount > 995)
! SELECT o.id, o.user_id FROM orders o WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = o.user_id AND u.age > 86)
! SELECT count(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = o.user_id)
! [ordered] SELECT u.id FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id AND o.qty = 9) ORDER BY u.id LIMIT 25
SELECT id FROM users WHERE id NOT IN (SELECT user_id FROM orders)
SELECT u.id FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.amount > 999)
-- CTEs over reference tables alone: the same rows on every shard
! WITH big AS (SELECT code FROM countries WHERE population > 100000000) SELECT u.country, count(*) FROM users u JOIN big ON big.code = u.country GROUP BY u.country
! [ordered] WITH c AS (SELECT code, name FROM countries) SELECT u.id, c.name FROM users u JOIN c ON c.code = u.country ORDER BY u.id LIMIT 20
! WITH big AS (SELECT code FROM countries WHERE population > 100000000) SELECT count(*) FROM users u WHERE u.country IN (SELECT code FROM big)
! WITH c AS (SELECT code, name FROM countries) SELECT u.id, c.name FROM users u JOIN c ON c.code = u.country WHERE u.id < -1990
WITH o AS (SELECT user_id FROM orders WHERE amount > 990) SELECT count(*) FROM o
-- Subqueries, CTEs and set-operation branches pinned to keys of one shard:
-- the statement runs whole there (5 and 1005 share a shard or not; either
-- way the answer is exact or refused)
! SELECT * FROM (SELECT id, name, age FROM users WHERE id = 17) s WHERE s.age > 0
! WITH mine AS (SELECT * FROM orders WHERE user_id = 17) SELECT count(*), sum(amount) FROM mine
! SELECT u.name, (SELECT count(*) FROM orders o WHERE o.user_id = 17) FROM users u WHERE u.id = 17
! SELECT c.name, (SELECT max(amount) FROM orders o WHERE o.user_id = 42) FROM countries c
! SELECT id FROM users WHERE id = 42 AND age >= (SELECT min(age) FROM users WHERE id = 42)
! [ordered] SELECT id FROM users WHERE id = 42 UNION SELECT user_id FROM orders WHERE user_id = 42 UNION SELECT 7 ORDER BY 1
! SELECT id, name FROM users WHERE id = 42 UNION ALL SELECT 0, name FROM countries
! SELECT user_id FROM orders WHERE user_id = 9 INTERSECT SELECT id FROM users WHERE id = 9
! SELECT id FROM users WHERE id = 9 EXCEPT SELECT user_id FROM orders WHERE user_id = 9 AND amount > 1000
! WITH a AS (SELECT * FROM users WHERE id = 42), b AS (SELECT * FROM orders WHERE user_id = 42) SELECT a.name, count(b.id) FROM a LEFT JOIN b ON b.user_id = a.id GROUP BY a.name
SELECT * FROM (SELECT id FROM users WHERE id IN (5, 1005)) s
SELECT id FROM users WHERE id = 5 UNION SELECT user_id FROM orders WHERE user_id = 1005
SELECT * FROM users WHERE age > (SELECT avg(age) FROM users WHERE id = 5)
-- UNION ALL of plain reads of sharded tables: the shards' rows concatenated
! SELECT id FROM users UNION ALL SELECT user_id FROM orders
! SELECT id, name FROM users WHERE age > 85 UNION ALL SELECT u.id, c.name FROM users u JOIN countries c ON c.code = u.country WHERE u.age < 3
! SELECT o.user_id, o.amount FROM orders o WHERE o.amount > 990 UNION ALL SELECT id, score FROM users WHERE id < -1990 UNION ALL SELECT id, score FROM users WHERE id = 3
SELECT id FROM users UNION ALL SELECT 1 FROM countries
SELECT id FROM users UNION ALL SELECT user_id FROM orders ORDER BY 1 LIMIT 5
-- FETCH FIRST ... WITH TIES: the ties of the last row come from every shard
! [ordered:1] SELECT age, id, name FROM users ORDER BY age FETCH FIRST 10 ROWS WITH TIES
! [ordered:1] SELECT age, id FROM users WHERE active ORDER BY age DESC OFFSET 5 FETCH FIRST 3 ROWS WITH TIES
! [ordered:1,2] SELECT o.qty, o.amount, o.id FROM orders o WHERE o.qty IS NOT NULL ORDER BY 1, 2 FETCH NEXT 1 ROW WITH TIES
! [ordered] SELECT id FROM users ORDER BY id FETCH FIRST 5 ROWS WITH TIES
! [ordered:1] SELECT u.country, u.id FROM users u JOIN orders o ON o.user_id = u.id WHERE o.amount > 990 ORDER BY u.country FETCH FIRST 2 ROWS WITH TIES
SELECT DISTINCT age FROM users ORDER BY age FETCH FIRST 3 ROWS WITH TIES
SELECT age, count(*) FROM users GROUP BY age ORDER BY 2 FETCH FIRST 2 ROWS WITH TIES
