//! Every attribute key natsfn puts on a span or span event, in one place:
//! the OpenTelemetry semantic conventions of [`super::SEMCONV_SCHEMA_URL`]
//! (messaging, database, exceptions, errors) and natsfn's own `natsfn.*`.
//! Static keys cost nothing to attach.

use opentelemetry::Key;

pub(crate) const MESSAGING_SYSTEM: Key = Key::from_static_str("messaging.system");
pub(crate) const OPERATION_TYPE: Key = Key::from_static_str("messaging.operation.type");
pub(crate) const OPERATION_NAME: Key = Key::from_static_str("messaging.operation.name");
pub(crate) const DESTINATION_NAME: Key = Key::from_static_str("messaging.destination.name");
pub(crate) const SUBSCRIPTION_NAME: Key = Key::from_static_str("messaging.destination.subscription.name");
pub(crate) const DESTINATION_TEMPLATE: Key = Key::from_static_str("messaging.destination.template");
pub(crate) const CONSUMER_GROUP: Key = Key::from_static_str("messaging.consumer.group.name");
pub(crate) const BODY_SIZE: Key = Key::from_static_str("messaging.message.body.size");
pub(crate) const MESSAGE_ID: Key = Key::from_static_str("messaging.message.id");

pub(crate) const DB_SYSTEM: Key = Key::from_static_str("db.system.name");
pub(crate) const DB_OPERATION: Key = Key::from_static_str("db.operation.name");
pub(crate) const DB_NAMESPACE: Key = Key::from_static_str("db.namespace");

pub(crate) const ERROR_TYPE: Key = Key::from_static_str("error.type");
pub(crate) const EXCEPTION_TYPE: Key = Key::from_static_str("exception.type");
pub(crate) const EXCEPTION_MESSAGE: Key = Key::from_static_str("exception.message");

pub(crate) const JS_STREAM: Key = Key::from_static_str("natsfn.jetstream.stream");
pub(crate) const JS_SEQUENCE: Key = Key::from_static_str("natsfn.jetstream.stream_sequence");
pub(crate) const JS_DELIVERED: Key = Key::from_static_str("natsfn.jetstream.delivered");
pub(crate) const HANDLER: Key = Key::from_static_str("natsfn.handler");
pub(crate) const HANDLER_VERSION: Key = Key::from_static_str("natsfn.handler.version");
pub(crate) const TENANT: Key = Key::from_static_str("natsfn.tenant");
pub(crate) const OUTCOME: Key = Key::from_static_str("natsfn.outcome");
pub(crate) const BUCKET: Key = Key::from_static_str("natsfn.bucket");
pub(crate) const KEY: Key = Key::from_static_str("natsfn.key");

/// On guest log-line events: the same fields as the line in the host log.
pub(crate) const LOG_HANDLER: Key = Key::from_static_str("handler");
pub(crate) const LOG_TENANT: Key = Key::from_static_str("tenant");
pub(crate) const LOG_LEVEL: Key = Key::from_static_str("level");
pub(crate) const LOG_STREAM: Key = Key::from_static_str("stream");
pub(crate) const LOG_TRACE_ID: Key = Key::from_static_str("trace_id");
pub(crate) const LOG_SPAN_ID: Key = Key::from_static_str("span_id");
