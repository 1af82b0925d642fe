//! The `gateway-queue` component's PostgreSQL schema.

use kiln_store::Migration;

/// The component's PostgreSQL migrations (never edit a released one).
pub const MIGRATIONS: &[Migration] = &[Migration {
    name: "shared async queue, task events, async configs, outbox, nonces, timer ticks",
    sql: "
        CREATE TABLE async_messages (
            seq BIGSERIAL PRIMARY KEY,
            account_id TEXT NOT NULL,
            function_name TEXT NOT NULL,
            queue TEXT NOT NULL,
            task_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            payload BYTEA NOT NULL,
            headers TEXT NOT NULL,
            status TEXT NOT NULL,
            done BOOLEAN NOT NULL DEFAULT false,
            retries BIGINT NOT NULL DEFAULT 0,
            throttles BIGINT NOT NULL DEFAULT 0,
            deliveries BIGINT NOT NULL DEFAULT 0,
            visible_ms BIGINT NOT NULL,
            created_ms BIGINT NOT NULL,
            end_ms BIGINT,
            error TEXT,
            return_payload BYTEA,
            owner TEXT,
            UNIQUE (account_id, function_name, task_id)
        );
        CREATE INDEX async_messages_pending ON async_messages (queue, visible_ms, seq) WHERE NOT done;
        CREATE INDEX async_messages_unfinished ON async_messages (account_id) WHERE NOT done;
        CREATE INDEX async_messages_by_function ON async_messages (account_id, function_name, seq);
        CREATE INDEX async_messages_finished ON async_messages (end_ms) WHERE done;
        CREATE TABLE async_task_events (
            event_id BIGSERIAL PRIMARY KEY,
            seq BIGINT NOT NULL,
            status TEXT NOT NULL,
            ts_ms BIGINT NOT NULL,
            detail TEXT NOT NULL
        );
        CREATE INDEX async_task_events_by_task ON async_task_events (seq);
        CREATE TABLE async_configs (
            account_id TEXT NOT NULL,
            function_name TEXT NOT NULL,
            qualifier TEXT NOT NULL,
            doc TEXT NOT NULL,
            PRIMARY KEY (account_id, function_name, qualifier)
        );
        CREATE TABLE async_outbox (
            id BIGSERIAL PRIMARY KEY,
            account_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            target TEXT NOT NULL,
            record TEXT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            next_ms BIGINT NOT NULL,
            owner TEXT
        );
        CREATE INDEX async_outbox_due ON async_outbox (next_ms, id);
        CREATE TABLE signature_nonces (
            access_key_id TEXT NOT NULL,
            nonce TEXT NOT NULL,
            expires_ms BIGINT NOT NULL,
            PRIMARY KEY (access_key_id, nonce)
        );
        CREATE INDEX signature_nonces_expiry ON signature_nonces (expires_ms);
        CREATE TABLE timer_ticks (
            account_id TEXT NOT NULL,
            function_name TEXT NOT NULL,
            trigger_name TEXT NOT NULL,
            tick_ms BIGINT NOT NULL,
            fired_ms BIGINT NOT NULL,
            PRIMARY KEY (account_id, function_name, trigger_name, tick_ms)
        );
        CREATE INDEX timer_ticks_by_tick ON timer_ticks (tick_ms);
    ",
}];
