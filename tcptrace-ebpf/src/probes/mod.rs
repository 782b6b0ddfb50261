mod bind;
mod clock;
mod direct;
mod skb;
mod sock;
mod tcp;
