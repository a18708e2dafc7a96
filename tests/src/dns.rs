//! A real DNS server (UDP) for DNS cluster tests: every A query is answered
//! with the address and TTL set now, so a test can move a name while a
//! proxy resolves it; other queries get an empty answer.

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

pub struct Dns {
    pub addr: SocketAddr,
    answer: Arc<Mutex<(Ipv4Addr, u32)>>,
    /// A queries answered so far.
    pub queries: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Dns {
    /// From now on, A queries get `ip` with `ttl` seconds.
    pub fn set(&self, ip: Ipv4Addr, ttl: u32) {
        *self.answer.lock().unwrap() = (ip, ttl);
    }
}

fn reply(query: &Message, answer: (Ipv4Addr, u32)) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true)
        .set_response_code(ResponseCode::NoError);
    for q in query.queries() {
        m.add_query(q.clone());
        if q.query_type() == RecordType::A {
            m.add_answer(Record::from_rdata(
                q.name().clone(),
                answer.1,
                RData::A(A(answer.0)),
            ));
        }
    }
    m.to_vec().ok()
}

/// Starts the server on 127.0.0.1, answering A queries with `ip` and `ttl`.
pub async fn start(ip: Ipv4Addr, ttl: u32) -> anyhow::Result<Dns> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = sock.local_addr()?;
    let answer = Arc::new(Mutex::new((ip, ttl)));
    let queries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (a, q) = (answer.clone(), queries.clone());
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if query
                .queries()
                .iter()
                .any(|x| x.query_type() == RecordType::A)
            {
                q.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let current = *a.lock().unwrap();
            if let Some(bytes) = reply(&query, current) {
                let _ = sock.send_to(&bytes, peer).await;
            }
        }
    });
    Ok(Dns {
        addr,
        answer,
        queries,
        task,
    })
}
